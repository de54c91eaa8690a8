"""Webhook endpoints through the API, over the webhook desk: admins read, managers change.

The secret is in the answer of create and rotate-secret only. A URL the desk refuses
(malformed, or leading to a loopback, link-local or private address without
`allow_private`) is a 422 whose detail names what is wrong with it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from gateway.access import Permission
from gateway.store.models import WebhookEndpoint
from gateway.webhooks.desk import EndpointDisabled, EndpointNotFound, WebhookDesk, WebhookError
from web.api import models as m
from web.api.declare import Call, NoBody, NoQuery, Operation
from web.problem_details import ProblemResponse


@contextmanager
def _refusals() -> Iterator[None]:
    try:
        yield
    except EndpointNotFound as exc:
        raise ProblemResponse.refused(404, exc) from exc
    except EndpointDisabled as exc:
        raise ProblemResponse.refused(409, exc) from exc
    except WebhookError as exc:
        raise ProblemResponse.refused(422, exc) from exc


def _out(e: WebhookEndpoint) -> dict[str, Any]:
    return {
        "id": e.id,
        "url": e.url,
        "description": e.description,
        "event_types": list(e.event_types),
        "enabled": e.enabled,
        "thin": e.thin,
        "allow_private": e.allow_private,
        "created_at": e.created_at,
        "disabled_reason": e.disabled_reason,
        "failing_since": e.failing_since,
        "previous_secret_until": e.previous_secret_until,
    }


@dataclass(frozen=True)
class WebhookOperations:
    webhooks: WebhookDesk

    async def list_webhooks(self, call: Call[NoQuery, NoBody]) -> m.WebhookList:
        return m.WebhookList(
            items=[m.WebhookOut(**_out(e)) for e in await self.webhooks.list_endpoints()]
        )

    async def create_webhook(self, call: Call[NoQuery, m.WebhookCreate]) -> m.WebhookCreated:
        b = call.body
        with _refusals():
            made = await self.webhooks.create(
                b.url,
                event_types=b.event_types,
                description=b.description,
                enabled=b.enabled,
                thin=b.thin,
                allow_private=b.allow_private,
                by=call.principal.name,
            )
        return m.WebhookCreated(**_out(made.endpoint), secret=made.secret)

    async def get_webhook(self, call: Call[NoQuery, NoBody]) -> m.WebhookOut:
        with _refusals():
            return m.WebhookOut(**_out(await self.webhooks.get(call.path["id"])))

    async def change_webhook(self, call: Call[NoQuery, m.WebhookPatch]) -> m.WebhookOut:
        """The fields given change; `enabled` last, so an endpoint is never enabled with a
        URL that was just refused."""
        b, endpoint_id, by = call.body, call.path["id"], call.principal.name
        with _refusals():
            endpoint = await self.webhooks.update(
                endpoint_id,
                url=b.url,
                event_types=b.event_types,
                description=b.description,
                thin=b.thin,
                allow_private=b.allow_private,
                by=by,
            )
            if b.enabled is True:
                endpoint = await self.webhooks.enable(endpoint_id, by=by)
            elif b.enabled is False:
                endpoint = await self.webhooks.disable(endpoint_id, by=by)
        return m.WebhookOut(**_out(endpoint))

    async def delete_webhook(self, call: Call[NoQuery, NoBody]) -> None:
        with _refusals():
            await self.webhooks.delete(call.path["id"], by=call.principal.name)

    async def rotate_webhook_secret(self, call: Call[NoQuery, NoBody]) -> m.WebhookSecret:
        endpoint_id = call.path["id"]
        with _refusals():
            secret = await self.webhooks.rotate_secret(endpoint_id, by=call.principal.name)
            endpoint = await self.webhooks.get(endpoint_id)
        assert endpoint.previous_secret_until is not None
        return m.WebhookSecret(secret=secret, previous_secret_until=endpoint.previous_secret_until)

    async def test_webhook(self, call: Call[NoQuery, NoBody]) -> m.WebhookTest:
        with _refusals():
            seq = await self.webhooks.send_test(call.path["id"], by=call.principal.name)
        return m.WebhookTest(seq=seq)

    async def replay_webhook(self, call: Call[NoQuery, m.WebhookReplay]) -> m.WebhookReplayed:
        b = call.body
        with _refusals():
            queued = await self.webhooks.replay(
                call.path["id"], seq=b.seq, since=b.since, until=b.until
            )
        return m.WebhookReplayed(queued=queued)

    async def list_webhook_deliveries(
        self, call: Call[m.DeliveriesQuery, NoBody]
    ) -> m.WebhookDeliveries:
        with _refusals():
            rows = await self.webhooks.deliveries(call.path["id"], call.query.limit)
        return m.WebhookDeliveries(
            items=[
                m.WebhookDeliveryOut(
                    id=d.id,
                    event_seq=d.event_seq,
                    event_type=d.event_type,
                    status=d.status,
                    attempts=d.attempts,
                    last_status_code=d.last_status_code,
                    last_error=d.last_error,
                    next_attempt_at=d.next_attempt_at,
                    updated_at=d.updated_at,
                )
                for d in rows
            ]
        )

    def operations(self, prefix: str) -> list[Operation[Any, Any]]:
        admin, manage = Permission.VIEW_ADMIN, Permission.MANAGE
        one = f"{prefix}/webhooks/{{id}}"
        return [
            Operation("GET", f"{prefix}/webhooks", admin, "List webhook endpoints",
                      self.list_webhooks, NoQuery, NoBody, m.WebhookList),
            Operation("POST", f"{prefix}/webhooks", manage,
                      "Create a webhook endpoint (its secret is shown once)",
                      self.create_webhook, NoQuery, m.WebhookCreate, m.WebhookCreated, 201),
            Operation("GET", one, admin, "A webhook endpoint",
                      self.get_webhook, NoQuery, NoBody, m.WebhookOut, errors=(404,)),
            Operation("PATCH", one, manage,
                      "Change an endpoint's URL, event types, description, payloads; enable or"
                      " disable it",
                      self.change_webhook, NoQuery, m.WebhookPatch, m.WebhookOut, errors=(404,)),
            Operation("DELETE", one, manage, "Delete an endpoint and its deliveries",
                      self.delete_webhook, NoQuery, NoBody, None, errors=(404,)),
            Operation("POST", f"{one}/rotate-secret", manage,
                      "A new secret (shown once); the previous one signs beside it for a day",
                      self.rotate_webhook_secret, NoQuery, NoBody, m.WebhookSecret,
                      errors=(404,)),
            Operation("POST", f"{one}/test", manage, "Send the endpoint a webhook.test event",
                      self.test_webhook, NoQuery, NoBody, m.WebhookTest, 202, errors=(404, 409)),
            Operation("POST", f"{one}/replay", manage,
                      "Deliver one event (seq) or a time range (since, until) again",
                      self.replay_webhook, NoQuery, m.WebhookReplay, m.WebhookReplayed, 202,
                      errors=(404, 409)),
            Operation("GET", f"{one}/deliveries", admin, "The endpoint's recent deliveries",
                      self.list_webhook_deliveries, m.DeliveriesQuery, NoBody,
                      m.WebhookDeliveries, errors=(404,)),
        ]  # fmt: skip
