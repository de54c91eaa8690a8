"""What the relay keeps: the database, its models and migrations, the journal and its event
catalog, the blob store, the sweeper.
"""
