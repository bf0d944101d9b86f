-- +goose Up
-- Recovery (issue 6): Checkout Sessions that collect a failed charge on-session, the refunds of a
-- second collection, and what the database does when a charge is settled another way.

-- Each recovery round opens one session first; /recover/{token} opens the next one when the last
-- has expired. The idempotency key (charge, round, seq) comes from the database
-- (recoveries.next_session_seq), so two requests that race for a fresh session send the same key
-- and get the same session.
alter table billing.recovery_sessions
    add column seq             integer not null default 1 check (seq >= 1),
    -- null for a session billingd learned of from Stripe only (RecoveryPaidTx records it).
    add column idempotency_key text unique check (btrim(idempotency_key) <> ''),
    add column expired_at      timestamptz,
    add constraint recovery_sessions_seq_key unique (charge_id, round, seq),
    add constraint recovery_sessions_completed_check check ((status = 'completed') = (completed_at is not null));

-- expired_at follows status, whoever writes it (the expire_recovery job, the sweep, the
-- checkout.session.expired webhook): set when a session becomes expired, cleared when a late
-- payment completes it.
-- +goose StatementBegin
create function billing.recovery_sessions_expired_at() returns trigger
language plpgsql as $$
begin
    if new.status = 'expired' then
        new.expired_at := coalesce(new.expired_at, now());
    else
        new.expired_at := null;
    end if;
    return new;
end
$$;
-- +goose StatementEnd

create trigger recovery_sessions_expired_at before insert or update of status on billing.recovery_sessions
    for each row execute function billing.recovery_sessions_expired_at();

-- The seq of the next session of a recovery. It only grows: a session recorded with seq k moves
-- it past k, and so does a key that Stripe answered with a 5xx (which Stripe stores under the key,
-- so that key can never give a session again).
alter table billing.recoveries
    add column next_session_seq integer not null default 1 check (next_session_seq >= 1);

-- A notification about a charge that was settled before it could be delivered is skipped, not
-- sent: "please pay" after the money arrived would only confuse.
alter table billing.notifications drop constraint notifications_status_check;
alter table billing.notifications
    add constraint notifications_status_check check (status in ('pending', 'sent', 'failed', 'skipped'));
create index notifications_charge_idx on billing.notifications (charge_id) where charge_id is not null;

-- The reminder sweep looks for open recoveries whose reminder is due or whose window has ended.
create index recoveries_open_idx on billing.recoveries (opened_at) where status = 'open';
create index recoveries_reminder_idx on billing.recoveries (next_reminder_at) where status = 'open';

-- Refunds of a payment that collected a charge already collected (or canceled) another way:
-- one per PaymentIntent, made by the refund_payment job with its own idempotency key.
create table billing.refunds (
    id                  bigint generated always as identity primary key,
    charge_id           bigint not null references billing.charges (id),
    payment_intent_id   text not null unique check (payment_intent_id like 'pi\_%'),
    checkout_session_id text check (checkout_session_id like 'cs\_%'),
    amount              bigint not null check (amount > 0),
    currency            text not null references billing.currencies (code),
    -- already_collected: the charge had succeeded or been recovered by another payment;
    -- charge_canceled: finance canceled the charge before the customer paid.
    reason              text not null check (reason in ('already_collected', 'charge_canceled')),
    idempotency_key     text not null unique check (btrim(idempotency_key) <> ''),
    status              text not null default 'pending' check (status in ('pending', 'succeeded', 'failed')),
    stripe_refund_id    text unique check (stripe_refund_id like 're\_%'),
    last_error          text,
    created_at          timestamptz not null default now(),
    refunded_at         timestamptz,
    check ((status = 'succeeded') = (stripe_refund_id is not null and refunded_at is not null))
);
create index refunds_charge_idx on billing.refunds (charge_id);

-- billing.charges_close_recovery: when a charge is collected (by an automatic attempt, or late),
-- canceled or written off, its open recovery closes and each open recovery session gets an
-- expire_recovery job, in the same transaction as the status change, so the customer cannot pay a
-- second time through a page that is still open. It fires for every writer (the charge job,
-- webhooks, reconcile, billing.cancel_charge, the recovery sweep), so none of them can forget.
-- When the recovery page itself was paid, RecoveryPaidTx has completed that session first and
-- then marks the recovery paid.
-- +goose StatementBegin
create function billing.charges_close_recovery() returns trigger
language plpgsql as $$
begin
    update billing.recoveries r
    set status = case when new.status = 'uncollectible' then 'uncollectible' else 'closed' end,
        closed_at = now(), next_reminder_at = null
    where r.charge_id = new.id and r.status = 'open';

    -- A fresh statement sees a session committed by a notify_recovery job that held the
    -- recovery row until now.
    insert into river_job (args, kind, queue, max_attempts)
    select jsonb_build_object('charge_id', s.charge_id, 'checkout_session_id', s.checkout_session_id),
           'expire_recovery', 'default', 25
    from billing.recovery_sessions s
    where s.charge_id = new.id and s.status = 'open';
    if found then
        perform pg_notify(billing.recovery_river_channel(), '{"queue":"default"}');
    end if;
    return null;
end
$$;
-- +goose StatementEnd

-- The channel River's producers LISTEN on for insert notifications: "<schema of river_job>.river_insert".
-- +goose StatementBegin
create function billing.recovery_river_channel() returns text
language sql stable
as $$
    select n.nspname || '.river_insert'
    from pg_catalog.pg_class c join pg_catalog.pg_namespace n on n.oid = c.relnamespace
    where c.oid = 'river_job'::pg_catalog.regclass
$$;
-- +goose StatementEnd

-- River's tables live in the schema that was current when rivermigrate ran (schema.Migrate runs
-- both with the same connection settings). Pin it so that the trigger finds river_job whatever
-- the search_path of the session that changes the charge (finance's functions pin their own).
-- +goose StatementBegin
do $$
declare
    river_schema text;
begin
    select n.nspname into river_schema
    from pg_catalog.pg_class c join pg_catalog.pg_namespace n on n.oid = c.relnamespace
    where c.oid = pg_catalog.to_regclass('river_job');
    if river_schema is null then
        raise exception 'River''s table river_job is not on the search_path'
            using hint = 'Run billingd migrate, which applies River''s migrations first, with the search_path the daemon uses.';
    end if;
    execute format('alter function billing.charges_close_recovery() set search_path = pg_catalog, %I, pg_temp', river_schema);
    execute format('alter function billing.recovery_river_channel() set search_path = pg_catalog, %I, pg_temp', river_schema);
end
$$;
-- +goose StatementEnd

create trigger charges_close_recovery after update of status on billing.charges
    for each row
    when (new.status is distinct from old.status and new.status in ('succeeded', 'recovered', 'canceled', 'uncollectible'))
    execute function billing.charges_close_recovery();

-- +goose Down
drop trigger charges_close_recovery on billing.charges;
drop function billing.charges_close_recovery();
drop function billing.recovery_river_channel();
drop table billing.refunds;
drop index billing.recoveries_reminder_idx;
drop index billing.recoveries_open_idx;
drop index billing.notifications_charge_idx;
alter table billing.recoveries drop column next_session_seq;
alter table billing.notifications drop constraint notifications_status_check;
alter table billing.notifications
    add constraint notifications_status_check check (status in ('pending', 'sent', 'failed'));
drop trigger recovery_sessions_expired_at on billing.recovery_sessions;
drop function billing.recovery_sessions_expired_at();
alter table billing.recovery_sessions
    drop constraint recovery_sessions_completed_check,
    drop constraint recovery_sessions_seq_key,
    drop column expired_at,
    drop column idempotency_key,
    drop column seq;
