"""Webhooks: journal events pushed to the endpoints a CRM registers (Standard Webhooks)."""
