"""The console's sections by path: the pages that serve them and the navigation that links
them read the same names."""

from __future__ import annotations

CONSOLE = "/console"
HOME = CONSOLE + "/"
MESSAGES = CONSOLE + "/messages"
LETTERS = CONSOLE + "/letters"
ADMIN = CONSOLE + "/admin"
ACCOUNT = CONSOLE + "/account"
