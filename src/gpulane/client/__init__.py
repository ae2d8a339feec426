"""The gpulane SDK: ``Client`` (blocking) and ``AsyncClient`` (asyncio)."""

from gpulane.client.client import AsyncClient, Client

__all__ = ["AsyncClient", "Client"]
