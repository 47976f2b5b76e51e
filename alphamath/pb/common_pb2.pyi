from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class ModelInfo(_message.Message):
    __slots__ = ("model_id", "checkpoint", "checkpoint_path", "backend", "dtype", "max_batch_size", "max_input_chars", "max_new_tokens", "max_n")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_PATH_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_INPUT_CHARS_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_N_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    checkpoint: str
    checkpoint_path: str
    backend: str
    dtype: str
    max_batch_size: int
    max_input_chars: int
    max_new_tokens: int
    max_n: int
    def __init__(self, model_id: _Optional[str] = ..., checkpoint: _Optional[str] = ..., checkpoint_path: _Optional[str] = ..., backend: _Optional[str] = ..., dtype: _Optional[str] = ..., max_batch_size: _Optional[int] = ..., max_input_chars: _Optional[int] = ..., max_new_tokens: _Optional[int] = ..., max_n: _Optional[int] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("prefill_tokens", "decode_tokens")
    PREFILL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DECODE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    prefill_tokens: int
    decode_tokens: int
    def __init__(self, prefill_tokens: _Optional[int] = ..., decode_tokens: _Optional[int] = ...) -> None: ...
