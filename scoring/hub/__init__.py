"""Ranking a hub, the application of the scores: features and streamed statistics of every
model, cached (`features`); the ranking itself (`ranking`); its table, JSON and plot (`report`)."""
