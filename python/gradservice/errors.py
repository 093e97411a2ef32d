"""The one exception every failed call of gradservice.Client raises."""

import grpc


class GradServiceError(Exception):
    """A call that failed: the gRPC status code and the server's message.

    `code` is a grpc.StatusCode (INVALID_ARGUMENT for a malformed request, naming the field
    and value; UNAVAILABLE for a server that cannot be reached after the retries;
    DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, UNAUTHENTICATED, ...). `message` is the server's
    text, or the client's for failures it detects itself. str(err) is "CODE: message".
    """

    def __init__(self, code, message):
        if not isinstance(code, grpc.StatusCode):
            raise TypeError(f"code: expected a grpc.StatusCode, got {type(code).__name__}")
        self.code = code
        self.message = message
        super().__init__(f"{code.name}: {message}")

    def __reduce__(self):
        return (GradServiceError, (self.code, self.message))

    @classmethod
    def from_rpc_error(cls, error):
        """The GradServiceError of a grpc.RpcError raised by a call."""
        return cls(error.code(), error.details() or "")
