"""Deterministic, varied English text for benchmark prompts.

Everything is drawn from a ``random.Random`` the caller seeds, so the same seed
gives the same text on every machine. Three kinds of text:

* :func:`policy_document` -- a system prompt in the shape of a RAG scaffold: an
  assistant persona, rules, and numbered policy sections of templated sentences
  over a few hundred content words;
* :func:`user_question` -- a user message asking about the document;
* :func:`follow_up` -- a later turn of the same conversation.

Lengths are in words; :func:`fit_tokens` grows or trims a text to a token
target with a real tokenizer.
"""

from __future__ import annotations

import random
from typing import Callable

COMPANIES = ("Northwind Logistics", "Helios Energy", "Bluefin Insurance", "Orchard Health", "Quarry Analytics",
             "Atlas Freight", "Cobalt Bank", "Juniper Telecom", "Meridian Retail", "Summit Legal Services",
             "Tidewater Utilities", "Vertex Software", "Granite Manufacturing", "Lumen Education", "Harbor Travel")
DOMAINS = ("customer support", "claims handling", "billing", "onboarding", "incident response", "procurement",
           "data protection", "returns and refunds", "account security", "shipping", "warranty service",
           "scheduling", "compliance review", "technical support", "loyalty programs")
TOPICS = ("refund eligibility", "invoice disputes", "password resets", "delivery delays", "contract renewals",
          "data retention", "identity verification", "service outages", "price adjustments", "account closure",
          "warranty claims", "late payment fees", "address changes", "subscription upgrades", "damaged goods",
          "travel reimbursements", "loyalty points", "appointment changes", "export controls", "accessibility requests",
          "chargebacks", "duplicate orders", "privacy requests", "firmware updates", "installation visits")
SUBJECTS = ("the agent", "the customer", "the account owner", "the support team", "the claims adjuster",
            "the billing department", "a supervisor", "the assistant", "the reviewer", "the regional office",
            "the requester", "the on-call engineer", "the compliance officer", "the dispatcher", "the partner")
VERBS = ("must confirm", "should document", "may approve", "is required to verify", "must not disclose",
         "should escalate", "can waive", "must record", "should explain", "is expected to review",
         "may request", "must notify", "should summarize", "can schedule", "must reject")
OBJECTS = ("the order number", "the last four digits of the card", "the original receipt", "the shipping address",
           "the contract start date", "any prior tickets", "the requested amount", "the reason for the request",
           "the delivery window", "the serial number", "the account history", "written consent",
           "the photos of the damage", "the purchase channel", "the customer's preferred contact method")
CONDITIONS = ("before any change is made", "when the amount exceeds {n} dollars", "within {n} business days",
              "if the request arrives after {n} days", "unless the account is flagged", "for orders older than {n} days",
              "when the customer is a business client", "if the item was a final sale", "after two failed attempts",
              "when a supervisor is unavailable", "for repeat requests within {n} months", "during a declared outage",
              "if the customer asks in writing", "when local law requires it", "once the identity check passes")
REASONS = ("This protects customers from fraud.", "This keeps the audit trail complete.",
           "Regulators review these records every quarter.", "It avoids duplicate refunds.",
           "It keeps response times predictable.", "It reduces repeat contacts.",
           "Exceptions are reported in the monthly review.", "The finance team reconciles these weekly.",
           "It ensures every region applies the same rule.", "Missing details delay the resolution.")
QUESTION_OPENERS = ("Can you explain", "I need help understanding", "Please tell me", "Could you walk me through",
                    "What is the rule for", "How should I handle", "I'm confused about", "Quick question about",
                    "What happens with", "Can you summarize")
FOLLOW_OPENERS = ("Thanks, that helps.", "Okay, understood.", "Got it.", "That makes sense.",
                  "Thank you for the answer.", "Alright.", "Great, one more thing.", "I see.")
FOLLOW_ASKS = ("And what if", "What about the case where", "Does the same apply when", "How does that change if",
               "Is there an exception when", "What should I do if")
DETAILS = ("My order number is {code}.", "The amount is {n} dollars.", "This happened {n} days ago.",
           "I already contacted support twice.", "The package arrived with a broken seal.",
           "I am writing on behalf of my manager.", "The invoice reference is {code}.",
           "The account was opened {n} months ago.", "We are a small business client.",
           "I paid with a corporate card.", "I'm travelling and can't receive calls.",
           "The device shows error code {code}.")


def _num(rng: random.Random) -> int:
    return rng.choice((2, 3, 5, 7, 10, 14, 15, 30, 45, 60, 90, 100, 250, 500, 1000))


def _code(rng: random.Random) -> str:
    return f"{rng.choice('ABCDEFGHJKMNPQRSTUVWXYZ')}{rng.randint(10000, 99999)}"


def _fill(template: str, rng: random.Random) -> str:
    return template.replace("{n}", str(_num(rng))).replace("{code}", _code(rng))


def _first_words(text: str, n_words: int) -> str:
    """The text cut after its ``n_words``-th space-separated word."""
    return " ".join(text.split(" ")[:max(1, n_words)])


def policy_sentence(rng: random.Random) -> str:
    s = f"{rng.choice(SUBJECTS).capitalize()} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {_fill(rng.choice(CONDITIONS), rng)}."
    if rng.random() < 0.35:
        s += " " + rng.choice(REASONS)
    return s


def policy_document(rng: random.Random, n_words: int) -> str:
    """A system prompt of about ``n_words`` words (at least the persona line)."""
    company, domain = rng.choice(COMPANIES), rng.choice(DOMAINS)
    parts = [f"You are the {domain} assistant of {company}. Answer using only the policy below. "
             "Be concise, cite the section number you rely on, and say so when the policy does not cover a question."]
    words = len(parts[0].split())
    section = 0
    while words < n_words:
        section += 1
        topic = rng.choice(TOPICS)
        head = f"\n\nSection {section}: {topic.capitalize()}."
        parts.append(head)
        words += len(head.split())
        for _ in range(rng.randint(3, 6)):
            s = policy_sentence(rng)
            parts.append(" " + s)
            words += len(s.split())
            if words >= n_words:
                break
    return _first_words("".join(parts), n_words)


def _padded(rng: random.Random, first: str, n_words: int) -> str:
    parts, words = [first], len(first.split())
    while words < n_words:
        s = _fill(rng.choice(DETAILS), rng) if rng.random() < 0.6 else policy_sentence(rng)
        parts.append(s)
        words += len(s.split())
    return _first_words(" ".join(parts), n_words)


def user_question(rng: random.Random, n_words: int) -> str:
    first = f"{rng.choice(QUESTION_OPENERS)} {rng.choice(TOPICS)} {_fill(rng.choice(CONDITIONS), rng)}?"
    return _padded(rng, first, n_words)


def follow_up(rng: random.Random, n_words: int) -> str:
    first = f"{rng.choice(FOLLOW_OPENERS)} {rng.choice(FOLLOW_ASKS)} {_fill(rng.choice(CONDITIONS), rng)}?"
    return _padded(rng, first, n_words)


def fit_tokens(make: Callable[[int], str], target: int, count: Callable[[str], int] | None,
               words_per_token: float = 0.75) -> str:
    """``make(n_words)`` regenerated until its token count is within 5% of ``target``
    (at most four tries, each rescaling the word count by the measured ratio).
    ``make`` must be deterministic for a word count (it re-seeds its own rng).
    Without a tokenizer the calibrated ``words_per_token`` is used once."""
    n_words = max(1, round(target * words_per_token))
    text = make(n_words)
    if count is None or target <= 0:
        return text
    for _ in range(4):
        n = count(text)
        if abs(n - target) <= max(2, 0.05 * target):
            break
        n_words = max(1, round(n_words * target / max(n, 1)))
        text = make(n_words)
    return text
