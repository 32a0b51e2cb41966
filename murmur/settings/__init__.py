"""Typed settings, one section per stage. `murmur.config` composes them into one recipe."""
