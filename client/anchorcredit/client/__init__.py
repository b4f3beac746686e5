"""anchorcredit.client: the light client (numpy, grpcio, protobuf, redis; never torch).

    from anchorcredit.client import CreditClient, reweight
    client = CreditClient(["127.0.0.1:50051"], cache="redis://127.0.0.1:6379/0")
    # or CreditClient(config=ClientConfig.from_env()): ANCHORCREDIT_TARGETS, _CACHE, ...
    res = client.score(prompts, responses, strategy="coupled_rhythm")
    adv = reweight(advantages, [r.gamma for r in res], response_mask)

Trainer hooks live in `anchorcredit.client.adapters` (trl, verl, openrlhf, areal, skyrl),
imported lazily.
"""

from anchorcredit.client.cache import CreditCache, LRUBytesCache, RedisCache
from anchorcredit.client.client import CreditClient
from anchorcredit.client.config import ClientConfig
from anchorcredit.client.errors import CreditServiceError, StalePolicyVersionError
from anchorcredit.client.results import CreditResult
from anchorcredit.client.reweight import gamma_matrix, reweight

__all__ = [
    "ClientConfig",
    "CreditCache",
    "CreditClient",
    "CreditResult",
    "CreditServiceError",
    "LRUBytesCache",
    "RedisCache",
    "StalePolicyVersionError",
    "gamma_matrix",
    "reweight",
]
