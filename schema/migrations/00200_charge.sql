-- +goose Up
-- Charging (issue 5): what the database must enforce so that a charge is never sent twice and
-- never lost, plus the shared rate limit on calls to Stripe.

-- At most one attempt per charge is open (in flight, or sent with its answer lost). A new attempt,
-- with a new idempotency key, can only be recorded once the previous one is settled.
create unique index charge_attempts_one_open on billing.charge_attempts (charge_id)
    where outcome in ('in_flight', 'unknown');

-- The reconcile job looks for open attempts that have waited too long.
create index charge_attempts_open_idx on billing.charge_attempts (coalesce(last_try_at, started_at))
    where outcome in ('in_flight', 'unknown');

-- Card-network retry limits count the declines of one card (by fingerprint) over 30 days.
create index charge_attempts_declined_idx on billing.charge_attempts (payment_method_id, started_at)
    where outcome = 'declined';
create index payment_methods_fingerprint_idx on billing.payment_methods (fingerprint)
    where fingerprint is not null;

-- PaymentIntent ids are unique per attempt; webhooks and reconcile find their attempt by it.
create unique index charge_attempts_payment_intent_key on billing.charge_attempts (payment_intent_id)
    where payment_intent_id is not null;

alter table billing.charge_attempts
    -- The River job sending the attempt: a duplicate job leaves a live attempt to its owner,
    -- a River retry of the owner (same job id) resumes it with the same key.
    add column job_id bigint,
    -- The description sent, so that a replay of the key sends exactly the same request.
    add column description text,
    -- Stripe's error message (never a secret), for the operator reading the attempt.
    add column error_message text,
    -- Who settled the attempt: the charge job, a webhook, or the reconcile job.
    add column settled_by text check (settled_by in ('job', 'webhook', 'reconcile')),
    -- Why it was settled that way, when it was not the job's own answer.
    add column note text,
    add constraint charge_attempts_settled_check
        check ((outcome in ('in_flight', 'unknown')) = (settled_by is null));

-- +goose StatementBegin
-- A settled attempt is history: its outcome never changes again. Open attempts move between
-- in_flight (the job is still trying its key) and unknown (the reconcile job owns it).
create function billing.charge_attempts_guard() returns trigger
language plpgsql as $$
begin
    if old.outcome not in ('in_flight', 'unknown') and new.outcome is distinct from old.outcome then
        raise exception 'charge attempt %: outcome % is settled and cannot become %', old.id, old.outcome, new.outcome
            using errcode = 'check_violation';
    end if;
    if new.idempotency_key is distinct from old.idempotency_key or new.charge_id is distinct from old.charge_id
       or new.attempt_no is distinct from old.attempt_no or new.payment_method_id is distinct from old.payment_method_id
       or new.description is distinct from old.description then
        raise exception 'charge attempt %: key, charge, number, payment method and description are fixed once recorded', old.id
            using errcode = 'check_violation';
    end if;
    return new;
end
$$;
-- +goose StatementEnd

create trigger charge_attempts_guard before update on billing.charge_attempts
    for each row execute function billing.charge_attempts_guard();

-- A shared rate limit on calls to Stripe, for every replica together: a generic cell rate
-- algorithm. next_free is the theoretical time of the next free request slot; a replica leases a
-- few slots at once by moving it forward, and spends them at their times.
create table billing.rate_limits (
    name      text primary key check (btrim(name) <> ''),
    next_free timestamptz not null
);

-- +goose Down
drop table billing.rate_limits;
drop trigger charge_attempts_guard on billing.charge_attempts;
drop function billing.charge_attempts_guard();
alter table billing.charge_attempts
    drop constraint charge_attempts_settled_check,
    drop column note,
    drop column settled_by,
    drop column description,
    drop column job_id,
    drop column error_message;
drop index billing.charge_attempts_payment_intent_key;
drop index billing.payment_methods_fingerprint_idx;
drop index billing.charge_attempts_declined_idx;
drop index billing.charge_attempts_open_idx;
drop index billing.charge_attempts_one_open;
