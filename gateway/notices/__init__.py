"""The agent's optional mails about their messages: first downloads, letters about to expire."""
