"""A user's own rasa-sdk actions, registered through `actions.modules` of a `rasa` connector."""

from __future__ import annotations

from typing import Any

from rasa_sdk import Action, Tracker
from rasa_sdk.events import SlotSet
from rasa_sdk.executor import CollectingDispatcher
from rasa_sdk.interfaces import ActionExecutionRejection

from connectors import rasa_actions


class ActionVip(Action):
    def name(self) -> str:
        return "action_vip"

    async def run(
        self, dispatcher: CollectingDispatcher, tracker: Tracker, domain: dict[str, Any]
    ) -> list[dict[str, Any]]:
        rasa_actions.set_variable(tracker, "vip", True)
        rasa_actions.handoff(tracker, "vip-desk", "a VIP asked")
        dispatcher.utter_message(text="VIP noted.")
        return [SlotSet("vip", True)]


class ActionPicky(Action):
    def name(self) -> str:
        return "action_picky"

    async def run(
        self, dispatcher: CollectingDispatcher, tracker: Tracker, domain: dict[str, Any]
    ) -> list[dict[str, Any]]:
        raise ActionExecutionRejection(self.name(), "not now")
