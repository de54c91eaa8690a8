"""From an accepted envelope to durable copies: the pipeline and the materializers it plans
with.
"""
