"""Deciding what runs where: lanes, VRAM accounting, the claim loop."""
