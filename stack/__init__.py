"""The local stack: helpers that start and stand in for the services vtuber-letta runs against."""
