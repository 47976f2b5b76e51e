from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Method(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    METHOD_UNSPECIFIED: _ClassVar[Method]
    METHOD_GREEDY: _ClassVar[Method]
    METHOD_SBS: _ClassVar[Method]
    METHOD_MCTS: _ClassVar[Method]
    METHOD_MAJORITY: _ClassVar[Method]

class SelectBy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SELECT_BY_UNSPECIFIED: _ClassVar[SelectBy]
    SELECT_BY_Q: _ClassVar[SelectBy]
    SELECT_BY_VALUE: _ClassVar[SelectBy]
    SELECT_BY_VISITS: _ClassVar[SelectBy]
METHOD_UNSPECIFIED: Method
METHOD_GREEDY: Method
METHOD_SBS: Method
METHOD_MCTS: Method
METHOD_MAJORITY: Method
SELECT_BY_UNSPECIFIED: SelectBy
SELECT_BY_Q: SelectBy
SELECT_BY_VALUE: SelectBy
SELECT_BY_VISITS: SelectBy

class SearchParameters(_message.Message):
    __slots__ = ("iterations", "n_children", "c_puct", "temperature", "top_p", "max_new_tokens", "max_depth", "max_code_errors", "beam_b1", "beam_b2", "majority_k", "select_by", "seed", "leaves_per_call")
    ITERATIONS_FIELD_NUMBER: _ClassVar[int]
    N_CHILDREN_FIELD_NUMBER: _ClassVar[int]
    C_PUCT_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_DEPTH_FIELD_NUMBER: _ClassVar[int]
    MAX_CODE_ERRORS_FIELD_NUMBER: _ClassVar[int]
    BEAM_B1_FIELD_NUMBER: _ClassVar[int]
    BEAM_B2_FIELD_NUMBER: _ClassVar[int]
    MAJORITY_K_FIELD_NUMBER: _ClassVar[int]
    SELECT_BY_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    LEAVES_PER_CALL_FIELD_NUMBER: _ClassVar[int]
    iterations: int
    n_children: int
    c_puct: float
    temperature: float
    top_p: float
    max_new_tokens: int
    max_depth: int
    max_code_errors: int
    beam_b1: int
    beam_b2: int
    majority_k: int
    select_by: SelectBy
    seed: int
    leaves_per_call: int
    def __init__(self, iterations: _Optional[int] = ..., n_children: _Optional[int] = ..., c_puct: _Optional[float] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., max_new_tokens: _Optional[int] = ..., max_depth: _Optional[int] = ..., max_code_errors: _Optional[int] = ..., beam_b1: _Optional[int] = ..., beam_b2: _Optional[int] = ..., majority_k: _Optional[int] = ..., select_by: _Optional[_Union[SelectBy, str]] = ..., seed: _Optional[int] = ..., leaves_per_call: _Optional[int] = ...) -> None: ...

class SolveRequest(_message.Message):
    __slots__ = ("question", "method", "parameters", "ground_truth", "question_id", "include_tree")
    QUESTION_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    GROUND_TRUTH_FIELD_NUMBER: _ClassVar[int]
    QUESTION_ID_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_TREE_FIELD_NUMBER: _ClassVar[int]
    question: str
    method: Method
    parameters: SearchParameters
    ground_truth: str
    question_id: str
    include_tree: bool
    def __init__(self, question: _Optional[str] = ..., method: _Optional[_Union[Method, str]] = ..., parameters: _Optional[_Union[SearchParameters, _Mapping]] = ..., ground_truth: _Optional[str] = ..., question_id: _Optional[str] = ..., include_tree: _Optional[bool] = ...) -> None: ...

class SolutionStep(_message.Message):
    __slots__ = ("text", "kind", "code", "output", "code_error", "value", "q")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    CODE_ERROR_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    Q_FIELD_NUMBER: _ClassVar[int]
    text: str
    kind: str
    code: str
    output: str
    code_error: bool
    value: float
    q: float
    def __init__(self, text: _Optional[str] = ..., kind: _Optional[str] = ..., code: _Optional[str] = ..., output: _Optional[str] = ..., code_error: _Optional[bool] = ..., value: _Optional[float] = ..., q: _Optional[float] = ...) -> None: ...

class TreeSummary(_message.Message):
    __slots__ = ("nodes", "depth", "terminal_nodes", "root_visits", "tree_json")
    NODES_FIELD_NUMBER: _ClassVar[int]
    DEPTH_FIELD_NUMBER: _ClassVar[int]
    TERMINAL_NODES_FIELD_NUMBER: _ClassVar[int]
    ROOT_VISITS_FIELD_NUMBER: _ClassVar[int]
    TREE_JSON_FIELD_NUMBER: _ClassVar[int]
    nodes: int
    depth: int
    terminal_nodes: int
    root_visits: int
    tree_json: str
    def __init__(self, nodes: _Optional[int] = ..., depth: _Optional[int] = ..., terminal_nodes: _Optional[int] = ..., root_visits: _Optional[int] = ..., tree_json: _Optional[str] = ...) -> None: ...

class SolveResponse(_message.Message):
    __slots__ = ("answer", "steps", "value", "tree", "correct", "method", "checkpoint", "duration_s", "question_id", "sandbox_backend")
    ANSWER_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    TREE_FIELD_NUMBER: _ClassVar[int]
    CORRECT_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    DURATION_S_FIELD_NUMBER: _ClassVar[int]
    QUESTION_ID_FIELD_NUMBER: _ClassVar[int]
    SANDBOX_BACKEND_FIELD_NUMBER: _ClassVar[int]
    answer: str
    steps: _containers.RepeatedCompositeFieldContainer[SolutionStep]
    value: float
    tree: TreeSummary
    correct: bool
    method: str
    checkpoint: str
    duration_s: float
    question_id: str
    sandbox_backend: str
    def __init__(self, answer: _Optional[str] = ..., steps: _Optional[_Iterable[_Union[SolutionStep, _Mapping]]] = ..., value: _Optional[float] = ..., tree: _Optional[_Union[TreeSummary, _Mapping]] = ..., correct: _Optional[bool] = ..., method: _Optional[str] = ..., checkpoint: _Optional[str] = ..., duration_s: _Optional[float] = ..., question_id: _Optional[str] = ..., sandbox_backend: _Optional[str] = ...) -> None: ...

class SolveProgress(_message.Message):
    __slots__ = ("iterations_done", "iterations_total", "best_answer", "best_value", "nodes", "elapsed_s")
    ITERATIONS_DONE_FIELD_NUMBER: _ClassVar[int]
    ITERATIONS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    BEST_ANSWER_FIELD_NUMBER: _ClassVar[int]
    BEST_VALUE_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_S_FIELD_NUMBER: _ClassVar[int]
    iterations_done: int
    iterations_total: int
    best_answer: str
    best_value: float
    nodes: int
    elapsed_s: float
    def __init__(self, iterations_done: _Optional[int] = ..., iterations_total: _Optional[int] = ..., best_answer: _Optional[str] = ..., best_value: _Optional[float] = ..., nodes: _Optional[int] = ..., elapsed_s: _Optional[float] = ...) -> None: ...

class SolveEvent(_message.Message):
    __slots__ = ("progress", "result")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    progress: SolveProgress
    result: SolveResponse
    def __init__(self, progress: _Optional[_Union[SolveProgress, _Mapping]] = ..., result: _Optional[_Union[SolveResponse, _Mapping]] = ...) -> None: ...

class Question(_message.Message):
    __slots__ = ("id", "question", "ground_truth")
    ID_FIELD_NUMBER: _ClassVar[int]
    QUESTION_FIELD_NUMBER: _ClassVar[int]
    GROUND_TRUTH_FIELD_NUMBER: _ClassVar[int]
    id: str
    question: str
    ground_truth: str
    def __init__(self, id: _Optional[str] = ..., question: _Optional[str] = ..., ground_truth: _Optional[str] = ...) -> None: ...

class GenerateTreesRequest(_message.Message):
    __slots__ = ("questions", "parameters", "concurrency", "include_tree")
    QUESTIONS_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    CONCURRENCY_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_TREE_FIELD_NUMBER: _ClassVar[int]
    questions: _containers.RepeatedCompositeFieldContainer[Question]
    parameters: SearchParameters
    concurrency: int
    include_tree: bool
    def __init__(self, questions: _Optional[_Iterable[_Union[Question, _Mapping]]] = ..., parameters: _Optional[_Union[SearchParameters, _Mapping]] = ..., concurrency: _Optional[int] = ..., include_tree: _Optional[bool] = ...) -> None: ...

class GenerateTreesResult(_message.Message):
    __slots__ = ("question_id", "result", "published", "error")
    QUESTION_ID_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    PUBLISHED_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    question_id: str
    result: SolveResponse
    published: bool
    error: str
    def __init__(self, question_id: _Optional[str] = ..., result: _Optional[_Union[SolveResponse, _Mapping]] = ..., published: _Optional[bool] = ..., error: _Optional[str] = ...) -> None: ...
