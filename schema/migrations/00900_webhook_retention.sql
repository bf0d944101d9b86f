-- +goose Up
-- Stored webhook events are deleted once ingested and older than BILLING_WEBHOOK_RETENTION (the
-- prune_webhook_events job, hourly): their payloads carry customers' names, emails and card
-- details, and the table would otherwise grow for ever. This index finds them oldest first.
-- Events still 'received' (not yet ingested) are never deleted.
create index webhook_events_ingested_idx on billing.webhook_events (received_at) where status <> 'received';

-- +goose Down
drop index billing.webhook_events_ingested_idx;
