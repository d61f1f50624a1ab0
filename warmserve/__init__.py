"""warmserve: many LLMs served from one pool of pre-warmed GPU workers, swapped in milliseconds."""

from __future__ import annotations

__all__ = ["Controller", "ServerConfig", "SamplingParams", "ModelSpec"]

from warmserve.config import ModelSpec, SamplingParams, ServerConfig


def __getattr__(name: str):
    # The controller pulls in the HTTP-free server side; importing it lazily keeps `warmserve ps`
    # and friends quick.
    if name == "Controller":
        from warmserve.controller.controller import Controller

        return Controller
    raise AttributeError(name)
