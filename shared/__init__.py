"""Contracts and plumbing shared by every cadre process: messages, subjects, states, errors, settings."""
