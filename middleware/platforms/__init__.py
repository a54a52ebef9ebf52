"""Chat platforms, one module each; `PLATFORM_TYPES` maps a config `type:` to its class."""

from __future__ import annotations

from middleware.platforms.base import DeliveryError, Parsed, Platform, PlatformConfig, Rejected, WebhookRequest
from middleware.platforms.chatwoot import ChatwootPlatform
from middleware.platforms.console import ConsolePlatform
from middleware.platforms.generic import GenericPlatform
from middleware.platforms.matrix import MatrixPlatform
from middleware.platforms.playground import PlaygroundPlatform
from middleware.platforms.qiscus import QiscusPlatform
from middleware.platforms.qiscus_multichannel import QiscusMultichannelPlatform
from middleware.platforms.slack import SlackPlatform
from middleware.platforms.telegram import TelegramPlatform
from middleware.platforms.whatsapp import WhatsAppPlatform

PLATFORM_TYPES: dict[str, type[Platform]] = {
    "generic": GenericPlatform,
    "console": ConsolePlatform,
    "chatwoot": ChatwootPlatform,
    "matrix": MatrixPlatform,
    "telegram": TelegramPlatform,
    "whatsapp": WhatsAppPlatform,
    "slack": SlackPlatform,
    "qiscus": QiscusPlatform,
    "qiscus_multichannel": QiscusMultichannelPlatform,
    "playground": PlaygroundPlatform,
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
