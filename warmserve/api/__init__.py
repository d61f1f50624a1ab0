"""The HTTP layer: OpenAI-compatible and admin routes over a Controller."""

from warmserve.api.app import create_app

__all__ = ["create_app"]
