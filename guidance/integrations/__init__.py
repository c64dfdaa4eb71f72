"""Guidance inside other libraries' samplers (``guidance.integrations.diffusers``)."""
