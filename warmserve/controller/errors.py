"""What the controller refuses, each a type the HTTP layer maps to one status code."""

from __future__ import annotations


class ControllerError(Exception):
    """Base: `status` is the HTTP status, `code` the machine-readable error code."""

    status = 500
    code = "internal_error"


class InvalidRequest(ControllerError):
    status = 400
    code = "invalid_request"


class PromptTooLong(InvalidRequest):
    code = "context_length_exceeded"


class CheckpointInvalid(InvalidRequest):
    """The checkpoint at the given path cannot be loaded (the message names file and problem)."""

    code = "invalid_checkpoint"


class PathForbidden(ControllerError):
    status = 403
    code = "path_outside_model_root"


class ModelNotFound(ControllerError):
    status = 404
    code = "model_not_found"


class ModelExists(ControllerError):
    status = 409
    code = "model_exists"


class NoCapacity(ControllerError):
    """No worker can make room for this model now: pinned or explicitly loaded models hold the
    memory (the message names them); retrying after one is unloaded may succeed."""

    status = 503
    code = "no_capacity"
    retry_after_s = 5


class ModelUnavailable(ControllerError):
    """The model went away while the request ran: unloaded, or its worker died."""

    status = 503
    code = "model_unavailable"
    retry_after_s = 1


class Overloaded(ControllerError):
    """The model already holds as many requests as it admits; retrying later may succeed."""

    status = 503
    code = "overloaded"
    retry_after_s = 1


class LoadFailed(ControllerError):
    """The workers could not build the model for a reason that is not the client's."""

    status = 500
    code = "load_failed"


class QueueTimeout(ControllerError):
    """The request waited for its model's load (and the room for it) longer than its deadline."""

    status = 503
    code = "queue_timeout"
    retry_after_s = 5
