"""kvtier.connectors: engine integrations (vLLM KVConnectorBase_V1, SGLang HiCacheStorage); they use kvtier.client."""
