# sealrelay in a container: mount the config at /etc/sealrelay/sealrelay.toml and a volume
# at /var/lib/sealrelay for the SQLite database and blobs (or point them at PostgreSQL and,
# with [storage] url = "s3://bucket/prefix", an S3-compatible bucket: docs/object-storage.md).
FROM python:3.11-slim

# DejaVu for the consent PDF, so that Polish, Turkish, Greek, Cyrillic, Hebrew and Arabic
# names show as written ([letter] pdf_font below; the PDF's built-in fonts draw cp1252 only)
RUN apt-get update && apt-get install -y --no-install-recommends fonts-dejavu-core \
    && rm -rf /var/lib/apt/lists/*
RUN useradd --system --home /var/lib/sealrelay --create-home sealrelay
WORKDIR /opt/sealrelay
COPY pyproject.toml README.md ./
COPY sealrelay ./sealrelay
COPY gateway ./gateway
COPY rules ./rules
COPY web ./web
RUN pip install --no-cache-dir '.[s3]'

USER sealrelay
WORKDIR /var/lib/sealrelay
ENV SEALRELAY_CONFIG=/etc/sealrelay/sealrelay.toml \
    SEALRELAY_DATABASE__URL=sqlite+aiosqlite:////var/lib/sealrelay/sealrelay.db \
    SEALRELAY_STORAGE__PATH=/var/lib/sealrelay/blobs \
    SEALRELAY_WEB__LISTEN=0.0.0.0:8080 \
    SEALRELAY_LETTER__PDF_FONT=/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf
VOLUME ["/var/lib/sealrelay"]
EXPOSE 587 465 8080
HEALTHCHECK --interval=30s --timeout=5s CMD python -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=4)" || exit 1
CMD ["sealrelay", "serve"]
