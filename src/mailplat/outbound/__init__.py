"""Outbound delivery: MX routing, the SMTP client, retries and delivery status notifications."""
