"""What agents, IT and CRMs see and change: timelines, the event feed, API keys."""
