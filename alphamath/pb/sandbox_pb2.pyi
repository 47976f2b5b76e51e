from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ExecLimits(_message.Message):
    __slots__ = ("timeout_s", "memory_bytes", "max_output_chars")
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_OUTPUT_CHARS_FIELD_NUMBER: _ClassVar[int]
    timeout_s: float
    memory_bytes: int
    max_output_chars: int
    def __init__(self, timeout_s: _Optional[float] = ..., memory_bytes: _Optional[int] = ..., max_output_chars: _Optional[int] = ...) -> None: ...

class ExecuteRequest(_message.Message):
    __slots__ = ("cells", "limits")
    CELLS_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    cells: _containers.RepeatedScalarFieldContainer[str]
    limits: ExecLimits
    def __init__(self, cells: _Optional[_Iterable[str]] = ..., limits: _Optional[_Union[ExecLimits, _Mapping]] = ...) -> None: ...

class ExecuteResponse(_message.Message):
    __slots__ = ("stdout", "error", "timed_out", "duration_s", "backend")
    STDOUT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    TIMED_OUT_FIELD_NUMBER: _ClassVar[int]
    DURATION_S_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    stdout: str
    error: str
    timed_out: bool
    duration_s: float
    backend: str
    def __init__(self, stdout: _Optional[str] = ..., error: _Optional[str] = ..., timed_out: _Optional[bool] = ..., duration_s: _Optional[float] = ..., backend: _Optional[str] = ...) -> None: ...

class SandboxInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SandboxInfo(_message.Message):
    __slots__ = ("backend", "strength", "production", "pool_size", "timeout_s", "memory_bytes", "max_output_chars", "max_code_bytes", "max_concurrency")
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    STRENGTH_FIELD_NUMBER: _ClassVar[int]
    PRODUCTION_FIELD_NUMBER: _ClassVar[int]
    POOL_SIZE_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_OUTPUT_CHARS_FIELD_NUMBER: _ClassVar[int]
    MAX_CODE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_CONCURRENCY_FIELD_NUMBER: _ClassVar[int]
    backend: str
    strength: str
    production: bool
    pool_size: int
    timeout_s: float
    memory_bytes: int
    max_output_chars: int
    max_code_bytes: int
    max_concurrency: int
    def __init__(self, backend: _Optional[str] = ..., strength: _Optional[str] = ..., production: _Optional[bool] = ..., pool_size: _Optional[int] = ..., timeout_s: _Optional[float] = ..., memory_bytes: _Optional[int] = ..., max_output_chars: _Optional[int] = ..., max_code_bytes: _Optional[int] = ..., max_concurrency: _Optional[int] = ...) -> None: ...
