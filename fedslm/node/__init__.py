"""The institution's side: its policy, serving a round (train, evaluate, replay a paid release),
client-side clipping and the SecAgg+ client mod. Imports nothing from :mod:`fedslm.coordinator`."""
