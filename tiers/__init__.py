"""kvtier.tiers: storage tiers (CPU shared-memory arena, NVMe segments) and their shared pieces.

Depends only on kvtier.proto-free primitives; the daemon composes tiers, tiers never import the daemon.
"""
