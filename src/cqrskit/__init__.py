"""cqrskit: the "CQRS Pattern on Azure" reference architecture as a Python toolkit and service."""
