"""Peers measured side by side with cadre. Their code runs in their own environments, never imported here."""
