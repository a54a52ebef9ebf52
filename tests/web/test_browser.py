"""End to end in headless Chromium (Debian's /usr/bin/chromium, driven by Playwright; never a
downloaded browser): a user asks for a human in the playground, an agent signs in to the inbox,
claims, they talk both ways, the agent resolves, and the bot asks its satisfaction question.

Screenshots of both pages go to `test-artifacts/browser/` (or $SWITCHBOARD_ARTIFACTS/browser),
printed at the end of the run, so a person can look at what a user and an agent see.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from playwright.async_api import ConsoleMessage, Page, async_playwright, expect

from middleware.agents import add_agent
from tests.conftest import REPO, running
from tests.web.conftest import PASSWORD, SCREENSHOTS, web_config

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
VIEWPORT = {"width": 1280, "height": 800}

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium (apt-get install chromium)"
    ),
]


def artifacts() -> Path:
    base = Path(os.environ.get("SWITCHBOARD_ARTIFACTS") or REPO / "test-artifacts")
    folder = base / "browser"
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.png"):
        old.unlink()
    if folder not in SCREENSHOTS:
        SCREENSHOTS.append(folder)
    return folder


def watch(page: Page, problems: list[str], who: str) -> None:
    def console(message: ConsoleMessage) -> None:
        if message.type == "error":
            problems.append(f"{who} console: {message.text}")

    page.on("console", console)
    page.on("pageerror", lambda error: problems.append(f"{who} script error: {error}"))


async def test_a_user_asks_for_a_human_an_agent_helps_and_the_bot_asks_for_a_rating(
    tmp_path: Path, helpdesk_flows: Path
) -> None:
    shots = artifacts()
    print(f"screenshots: {shots}")
    settings = web_config(f"sqlite:///{tmp_path}/sb.db", helpdesk_flows)
    problems: list[str] = []
    async with running(settings) as (server, services), async_playwright() as pw:
        await add_agent(services.store, "alice", PASSWORD)
        browser = await pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            # two people, two browser profiles
            user = await (await browser.new_context(viewport=VIEWPORT)).new_page()
            agent = await (await browser.new_context(viewport=VIEWPORT)).new_page()
            for page, who in ((user, "playground"), (agent, "inbox")):
                page.set_default_timeout(15_000)
                watch(page, problems, who)

            # the user, in the playground, talks to the bot and asks for a person
            await user.goto(f"{server.url}/?flow=helpdesk")
            await expect(user.locator("#live-state")).to_have_text("live")
            # the start dot, start, rate, and "*" (the `always:` handoff, from any state, resumes at rate)
            await expect(user.locator("#graph svg .node")).to_have_count(4)
            await user.fill("#message", "hello")
            await user.press("#message", "Enter")
            await expect(user.locator(".from-bot .msg").last).to_have_text(
                "Hello Ana! I'm the Acme bot. Say 'human' to talk to a person."
            )
            await expect(user.locator(".trace").first).to_contain_text("state start: route at")
            await expect(user.locator("#graph svg .node.current title")).to_have_text("n_start")
            await user.fill("#message", "I need a human please")
            await user.press("#message", "Enter")
            await expect(user.locator(".from-bot .msg").last).to_have_text("Connecting you to a person at Acme.")
            await expect(user.locator("#owner-badge")).to_have_text("waiting for a person")
            await expect(user.locator(".trace").first).to_contain_text("handoff to support: queued")
            await user.screenshot(path=str(shots / "playground-1-asked-for-a-human.png"))

            # the agent signs in and finds the conversation waiting in `support`
            await agent.goto(f"{server.url}/inbox")
            await expect(agent).to_have_url(f"{server.url}/inbox/login?next=%2Finbox")
            await agent.fill("input[name=name]", "alice")
            await agent.fill("input[name=password]", PASSWORD)
            await agent.screenshot(path=str(shots / "inbox-0-sign-in.png"))
            await agent.click("button[type=submit]")
            await expect(agent.locator("#live-state")).to_have_text("live")
            await expect(agent.locator('tr[data-queue="support"] .count')).to_have_text("1")
            waiting = agent.locator(".list-waiting a")
            await expect(waiting).to_have_count(1)
            await expect(waiting).to_contain_text("I need a human please")
            await agent.screenshot(path=str(shots / "inbox-1-queue.png"))

            # claims it, reads the bot's part of the conversation, and answers
            await waiting.click()
            await expect(agent.locator(".transcript")).to_contain_text("hello")
            await expect(agent.locator(".transcript")).to_contain_text("Hello Ana! I'm the Acme bot.")
            await agent.click("#claim-button")
            await expect(agent.locator(".conv-owner .badge")).to_have_text("with you")
            await expect(agent.locator("#reply-button")).to_be_enabled()
            await agent.fill("#composer-text", "Hi Ana, I'm Alice. How can I help?")
            await agent.press("#composer-text", "Enter")
            await expect(agent.locator("#composer-text")).to_have_value("")

            # the user sees the agent's answer and writes back; the agent sees it arrive live
            await expect(user.locator(".from-agent .msg")).to_have_text("Hi Ana, I'm Alice. How can I help?")
            await expect(user.locator(".from-agent .byline")).to_have_text("agent alice")
            await expect(user.locator("#owner-badge")).to_have_text("with an agent")
            await user.fill("#message", "My order 123456 has not arrived")
            await user.press("#message", "Enter")
            await expect(agent.locator(".entry-user .text").last).to_have_text("My order 123456 has not arrived")
            await expect(user.locator(".from-bot")).to_have_count(2)  # the bot stayed silent

            await agent.fill("#composer-text", "Courier says tomorrow; follow up Friday.")
            await agent.click("#note-button")
            await expect(agent.locator(".entry-note .text")).to_have_text("Courier says tomorrow; follow up Friday.")
            await agent.fill("#composer-text", "It arrives tomorrow. Anything else?")
            await agent.click("#reply-button")
            await expect(user.locator(".from-agent .msg").last).to_have_text("It arrives tomorrow. Anything else?")
            await user.fill("#message", "No, thanks!")
            await user.press("#message", "Enter")
            await expect(agent.locator(".entry-user .text").last).to_have_text("No, thanks!")
            await expect(agent.locator(".entry-agent .status").last).to_have_text("sent")
            await agent.screenshot(path=str(shots / "inbox-2-conversation.png"))

            # the agent resolves; the bot takes over and asks its satisfaction question
            await agent.click("#resolve-button")
            await expect(agent.locator(".conv-owner .badge")).to_have_text("the bot answers")
            await expect(agent.locator("#reply-button")).to_be_disabled()
            await expect(user.locator(".from-bot .msg").last).to_have_text("How would you rate the help you got?")
            await expect(user.locator("#owner-badge")).to_have_text("bot")
            await expect(user.locator("#graph svg .node.current title")).to_have_text("n_rate")
            await expect(agent.locator(".transcript")).to_contain_text("How would you rate the help you got?")
            await expect(agent.locator(".entry-bot .status").last).to_have_text("sent")  # delivered, rechecked
            await agent.screenshot(path=str(shots / "inbox-3-resolved.png"))
            await user.locator(".from-bot .chips button", has_text="Great").click()
            await expect(user.locator(".from-bot .msg").last).to_have_text("Thanks for rating us: Great.")
            await user.screenshot(path=str(shots / "playground-2-rated.png"))
        finally:
            await browser.close()  # closes the pages' event streams before the server stops

    assert not problems, problems
    names = sorted(p.name for p in shots.glob("*.png"))
    assert names == [
        "inbox-0-sign-in.png",
        "inbox-1-queue.png",
        "inbox-2-conversation.png",
        "inbox-3-resolved.png",
        "playground-1-asked-for-a-human.png",
        "playground-2-rated.png",
    ]
