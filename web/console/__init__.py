"""The web console: sign-in, sessions and the pages signed-in users see."""
