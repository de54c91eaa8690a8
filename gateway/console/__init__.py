"""The web console's desks: signing in and out (sessions), and what later pages act through."""
