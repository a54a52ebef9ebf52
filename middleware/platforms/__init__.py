"""Chat platforms, one module each; `PLATFORM_TYPES` maps a config `type:` to its class."""

from __future__ import annotations

from middleware.platforms.base import DeliveryError, Parsed, Platform, PlatformConfig, Rejected, WebhookRequest
from middleware.platforms.console import ConsolePlatform
from middleware.platforms.generic import GenericPlatform

PLATFORM_TYPES: dict[str, type[Platform]] = {
    "generic": GenericPlatform,
    "console": ConsolePlatform,
}

__all__ = [
    "PLATFORM_TYPES",
    "DeliveryError",
    "Parsed",
    "Platform",
    "PlatformConfig",
    "Rejected",
    "WebhookRequest",
]
