"""The JSON API `/api/v1`: each operation declared once, in web/api/routes.py."""
