"""What agents, IT and CRMs see and change: console sessions, timelines, the event feed,
API keys, users and the queue."""
