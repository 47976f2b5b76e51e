import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TreeNode(_message.Message):
    __slots__ = ("id", "parent", "depth", "text", "kind", "code", "output", "code_error", "prior", "value", "visits", "value_sum", "q", "terminal_reason", "answer", "correct", "token_count", "children", "share")
    ID_FIELD_NUMBER: _ClassVar[int]
    PARENT_FIELD_NUMBER: _ClassVar[int]
    DEPTH_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    CODE_ERROR_FIELD_NUMBER: _ClassVar[int]
    PRIOR_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    VISITS_FIELD_NUMBER: _ClassVar[int]
    VALUE_SUM_FIELD_NUMBER: _ClassVar[int]
    Q_FIELD_NUMBER: _ClassVar[int]
    TERMINAL_REASON_FIELD_NUMBER: _ClassVar[int]
    ANSWER_FIELD_NUMBER: _ClassVar[int]
    CORRECT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_COUNT_FIELD_NUMBER: _ClassVar[int]
    CHILDREN_FIELD_NUMBER: _ClassVar[int]
    SHARE_FIELD_NUMBER: _ClassVar[int]
    id: int
    parent: int
    depth: int
    text: str
    kind: str
    code: str
    output: str
    code_error: bool
    prior: float
    value: float
    visits: int
    value_sum: float
    q: float
    terminal_reason: str
    answer: str
    correct: bool
    token_count: int
    children: _containers.RepeatedScalarFieldContainer[int]
    share: float
    def __init__(self, id: _Optional[int] = ..., parent: _Optional[int] = ..., depth: _Optional[int] = ..., text: _Optional[str] = ..., kind: _Optional[str] = ..., code: _Optional[str] = ..., output: _Optional[str] = ..., code_error: _Optional[bool] = ..., prior: _Optional[float] = ..., value: _Optional[float] = ..., visits: _Optional[int] = ..., value_sum: _Optional[float] = ..., q: _Optional[float] = ..., terminal_reason: _Optional[str] = ..., answer: _Optional[str] = ..., correct: _Optional[bool] = ..., token_count: _Optional[int] = ..., children: _Optional[_Iterable[int]] = ..., share: _Optional[float] = ...) -> None: ...

class TreeEvent(_message.Message):
    __slots__ = ("schema_version", "event_id", "question_id", "question", "ground_truth", "prompt", "checkpoint", "search_config_json", "nodes", "meta_json", "created_at")
    SCHEMA_VERSION_FIELD_NUMBER: _ClassVar[int]
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    QUESTION_ID_FIELD_NUMBER: _ClassVar[int]
    QUESTION_FIELD_NUMBER: _ClassVar[int]
    GROUND_TRUTH_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    SEARCH_CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    META_JSON_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    schema_version: int
    event_id: str
    question_id: str
    question: str
    ground_truth: str
    prompt: str
    checkpoint: str
    search_config_json: str
    nodes: _containers.RepeatedCompositeFieldContainer[TreeNode]
    meta_json: str
    created_at: _timestamp_pb2.Timestamp
    def __init__(self, schema_version: _Optional[int] = ..., event_id: _Optional[str] = ..., question_id: _Optional[str] = ..., question: _Optional[str] = ..., ground_truth: _Optional[str] = ..., prompt: _Optional[str] = ..., checkpoint: _Optional[str] = ..., search_config_json: _Optional[str] = ..., nodes: _Optional[_Iterable[_Union[TreeNode, _Mapping]]] = ..., meta_json: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class CheckpointEvent(_message.Message):
    __slots__ = ("schema_version", "checkpoint_id", "path", "round", "parent", "metrics", "promoted_at")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    SCHEMA_VERSION_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_ID_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    PARENT_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    PROMOTED_AT_FIELD_NUMBER: _ClassVar[int]
    schema_version: int
    checkpoint_id: str
    path: str
    round: int
    parent: str
    metrics: _containers.ScalarMap[str, float]
    promoted_at: _timestamp_pb2.Timestamp
    def __init__(self, schema_version: _Optional[int] = ..., checkpoint_id: _Optional[str] = ..., path: _Optional[str] = ..., round: _Optional[int] = ..., parent: _Optional[str] = ..., metrics: _Optional[_Mapping[str, float]] = ..., promoted_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...
