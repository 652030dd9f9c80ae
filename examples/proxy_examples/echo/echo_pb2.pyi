from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class EchoRequest(_message.Message):
    __slots__ = ("message", "payload", "count")
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    message: str
    payload: bytes
    count: int
    def __init__(self, message: _Optional[str] = ..., payload: _Optional[bytes] = ..., count: _Optional[int] = ...) -> None: ...

class EchoResponse(_message.Message):
    __slots__ = ("message", "payload", "backend")
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    message: str
    payload: bytes
    backend: str
    def __init__(self, message: _Optional[str] = ..., payload: _Optional[bytes] = ..., backend: _Optional[str] = ...) -> None: ...
