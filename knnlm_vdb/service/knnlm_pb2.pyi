from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class KnnSettings(_message.Message):
    __slots__ = ("lmbda", "k", "temperature", "adaptive")
    LMBDA_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    ADAPTIVE_FIELD_NUMBER: _ClassVar[int]
    lmbda: float
    k: int
    temperature: float
    adaptive: bool
    def __init__(self, lmbda: _Optional[float] = ..., k: _Optional[int] = ..., temperature: _Optional[float] = ..., adaptive: _Optional[bool] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("text", "domains", "settings", "neighbours")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    DOMAINS_FIELD_NUMBER: _ClassVar[int]
    SETTINGS_FIELD_NUMBER: _ClassVar[int]
    NEIGHBOURS_FIELD_NUMBER: _ClassVar[int]
    text: str
    domains: _containers.RepeatedScalarFieldContainer[str]
    settings: KnnSettings
    neighbours: int
    def __init__(self, text: _Optional[str] = ..., domains: _Optional[_Iterable[str]] = ..., settings: _Optional[_Union[KnnSettings, _Mapping]] = ..., neighbours: _Optional[int] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("token_ids", "tokens", "base_logprobs", "knn_logprobs", "logprobs", "scored_tokens", "base_ppl", "knnlm_ppl", "settings", "domains", "lambdas", "searched_fraction", "neighbours")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    BASE_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    KNN_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    SCORED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    BASE_PPL_FIELD_NUMBER: _ClassVar[int]
    KNNLM_PPL_FIELD_NUMBER: _ClassVar[int]
    SETTINGS_FIELD_NUMBER: _ClassVar[int]
    DOMAINS_FIELD_NUMBER: _ClassVar[int]
    LAMBDAS_FIELD_NUMBER: _ClassVar[int]
    SEARCHED_FRACTION_FIELD_NUMBER: _ClassVar[int]
    NEIGHBOURS_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    tokens: _containers.RepeatedScalarFieldContainer[str]
    base_logprobs: _containers.RepeatedScalarFieldContainer[float]
    knn_logprobs: _containers.RepeatedScalarFieldContainer[float]
    logprobs: _containers.RepeatedScalarFieldContainer[float]
    scored_tokens: int
    base_ppl: float
    knnlm_ppl: float
    settings: KnnSettings
    domains: _containers.RepeatedScalarFieldContainer[str]
    lambdas: _containers.RepeatedScalarFieldContainer[float]
    searched_fraction: float
    neighbours: _containers.RepeatedCompositeFieldContainer[TokenNeighbours]
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., tokens: _Optional[_Iterable[str]] = ..., base_logprobs: _Optional[_Iterable[float]] = ..., knn_logprobs: _Optional[_Iterable[float]] = ..., logprobs: _Optional[_Iterable[float]] = ..., scored_tokens: _Optional[int] = ..., base_ppl: _Optional[float] = ..., knnlm_ppl: _Optional[float] = ..., settings: _Optional[_Union[KnnSettings, _Mapping]] = ..., domains: _Optional[_Iterable[str]] = ..., lambdas: _Optional[_Iterable[float]] = ..., searched_fraction: _Optional[float] = ..., neighbours: _Optional[_Iterable[_Union[TokenNeighbours, _Mapping]]] = ...) -> None: ...

class TokenNeighbours(_message.Message):
    __slots__ = ("entries",)
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[Neighbour]
    def __init__(self, entries: _Optional[_Iterable[_Union[Neighbour, _Mapping]]] = ...) -> None: ...

class NextTokenRequest(_message.Message):
    __slots__ = ("context", "top_n", "domains", "settings")
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    TOP_N_FIELD_NUMBER: _ClassVar[int]
    DOMAINS_FIELD_NUMBER: _ClassVar[int]
    SETTINGS_FIELD_NUMBER: _ClassVar[int]
    context: str
    top_n: int
    domains: _containers.RepeatedScalarFieldContainer[str]
    settings: KnnSettings
    def __init__(self, context: _Optional[str] = ..., top_n: _Optional[int] = ..., domains: _Optional[_Iterable[str]] = ..., settings: _Optional[_Union[KnnSettings, _Mapping]] = ...) -> None: ...

class TokenProbability(_message.Message):
    __slots__ = ("token_id", "token", "prob", "base_prob", "knn_prob")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    PROB_FIELD_NUMBER: _ClassVar[int]
    BASE_PROB_FIELD_NUMBER: _ClassVar[int]
    KNN_PROB_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    token: str
    prob: float
    base_prob: float
    knn_prob: float
    def __init__(self, token_id: _Optional[int] = ..., token: _Optional[str] = ..., prob: _Optional[float] = ..., base_prob: _Optional[float] = ..., knn_prob: _Optional[float] = ...) -> None: ...

class NextTokenResponse(_message.Message):
    __slots__ = ("candidates", "settings", "domains")
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    SETTINGS_FIELD_NUMBER: _ClassVar[int]
    DOMAINS_FIELD_NUMBER: _ClassVar[int]
    candidates: _containers.RepeatedCompositeFieldContainer[TokenProbability]
    settings: KnnSettings
    domains: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, candidates: _Optional[_Iterable[_Union[TokenProbability, _Mapping]]] = ..., settings: _Optional[_Union[KnnSettings, _Mapping]] = ..., domains: _Optional[_Iterable[str]] = ...) -> None: ...

class Document(_message.Message):
    __slots__ = ("id", "text")
    ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    id: str
    text: str
    def __init__(self, id: _Optional[str] = ..., text: _Optional[str] = ...) -> None: ...

class AppendRequest(_message.Message):
    __slots__ = ("domain", "document", "replace")
    DOMAIN_FIELD_NUMBER: _ClassVar[int]
    DOCUMENT_FIELD_NUMBER: _ClassVar[int]
    REPLACE_FIELD_NUMBER: _ClassVar[int]
    domain: str
    document: Document
    replace: bool
    def __init__(self, domain: _Optional[str] = ..., document: _Optional[_Union[Document, _Mapping]] = ..., replace: _Optional[bool] = ...) -> None: ...

class AppendResponse(_message.Message):
    __slots__ = ("documents", "tokens", "added", "skipped", "count", "changed", "replaced")
    DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    ADDED_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    CHANGED_FIELD_NUMBER: _ClassVar[int]
    REPLACED_FIELD_NUMBER: _ClassVar[int]
    documents: int
    tokens: int
    added: int
    skipped: int
    count: int
    changed: _containers.RepeatedScalarFieldContainer[str]
    replaced: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, documents: _Optional[int] = ..., tokens: _Optional[int] = ..., added: _Optional[int] = ..., skipped: _Optional[int] = ..., count: _Optional[int] = ..., changed: _Optional[_Iterable[str]] = ..., replaced: _Optional[_Iterable[str]] = ...) -> None: ...

class ListDomainsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DomainInfo(_message.Message):
    __slots__ = ("name", "backend", "count", "model", "key_type", "settings")
    NAME_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    KEY_TYPE_FIELD_NUMBER: _ClassVar[int]
    SETTINGS_FIELD_NUMBER: _ClassVar[int]
    name: str
    backend: str
    count: int
    model: str
    key_type: str
    settings: KnnSettings
    def __init__(self, name: _Optional[str] = ..., backend: _Optional[str] = ..., count: _Optional[int] = ..., model: _Optional[str] = ..., key_type: _Optional[str] = ..., settings: _Optional[_Union[KnnSettings, _Mapping]] = ...) -> None: ...

class ListDomainsResponse(_message.Message):
    __slots__ = ("domains",)
    DOMAINS_FIELD_NUMBER: _ClassVar[int]
    domains: _containers.RepeatedCompositeFieldContainer[DomainInfo]
    def __init__(self, domains: _Optional[_Iterable[_Union[DomainInfo, _Mapping]]] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("prompt", "prompt_token_ids", "domains", "settings", "max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "seed", "stop", "neighbours")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    DOMAINS_FIELD_NUMBER: _ClassVar[int]
    SETTINGS_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DO_SAMPLE_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    NEIGHBOURS_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    domains: _containers.RepeatedScalarFieldContainer[str]
    settings: KnnSettings
    max_new_tokens: int
    do_sample: bool
    temperature: float
    top_k: int
    top_p: float
    seed: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    neighbours: int
    def __init__(self, prompt: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., domains: _Optional[_Iterable[str]] = ..., settings: _Optional[_Union[KnnSettings, _Mapping]] = ..., max_new_tokens: _Optional[int] = ..., do_sample: _Optional[bool] = ..., temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ..., neighbours: _Optional[int] = ...) -> None: ...

class Neighbour(_message.Message):
    __slots__ = ("domain", "doc_id", "position", "distance", "token_id", "token")
    DOMAIN_FIELD_NUMBER: _ClassVar[int]
    DOC_ID_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    DISTANCE_FIELD_NUMBER: _ClassVar[int]
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    domain: str
    doc_id: str
    position: int
    distance: float
    token_id: int
    token: str
    def __init__(self, domain: _Optional[str] = ..., doc_id: _Optional[str] = ..., position: _Optional[int] = ..., distance: _Optional[float] = ..., token_id: _Optional[int] = ..., token: _Optional[str] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("token_id", "token", "text", "prob", "base_prob", "knn_prob", "lmbda", "searched", "neighbours", "settings", "domains")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    PROB_FIELD_NUMBER: _ClassVar[int]
    BASE_PROB_FIELD_NUMBER: _ClassVar[int]
    KNN_PROB_FIELD_NUMBER: _ClassVar[int]
    LMBDA_FIELD_NUMBER: _ClassVar[int]
    SEARCHED_FIELD_NUMBER: _ClassVar[int]
    NEIGHBOURS_FIELD_NUMBER: _ClassVar[int]
    SETTINGS_FIELD_NUMBER: _ClassVar[int]
    DOMAINS_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    token: str
    text: str
    prob: float
    base_prob: float
    knn_prob: float
    lmbda: float
    searched: bool
    neighbours: _containers.RepeatedCompositeFieldContainer[Neighbour]
    settings: KnnSettings
    domains: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, token_id: _Optional[int] = ..., token: _Optional[str] = ..., text: _Optional[str] = ..., prob: _Optional[float] = ..., base_prob: _Optional[float] = ..., knn_prob: _Optional[float] = ..., lmbda: _Optional[float] = ..., searched: _Optional[bool] = ..., neighbours: _Optional[_Iterable[_Union[Neighbour, _Mapping]]] = ..., settings: _Optional[_Union[KnnSettings, _Mapping]] = ..., domains: _Optional[_Iterable[str]] = ...) -> None: ...
