-- +goose Up
-- Finance's SQL surface: ad-hoc charges and cancellations through two SECURITY DEFINER
-- functions, reports as views, and the role billing_finance that may use those and nothing else.
--
-- Every rejected call raises an error with a message, a HINT and one of these SQLSTATEs (class
-- BD, "billingd"; PostgreSQL uses no class BD), and writes nothing:
--
--   BD001  an argument is NULL, blank or too long
--   BD002  the amount is not positive
--   BD003  the amount is above the ad-hoc ceiling of its currency (billing.adhoc_limits)
--   BD004  the currency is not one billing knows (billing.currencies)
--   BD005  the customer is not billed in that currency
--   BD006  no customer has that customer_ref
--   BD007  the customer has no active consent that covers ad-hoc charges
--   BD008  the customer has no attached default payment method
--   BD009  the request_key names a charge with other parameters
--   BD010  no charge has that id
--   BD011  the charge cannot be canceled in its current status
--
-- Forbidden actions fail with PostgreSQL's own 42501 (insufficient_privilege).

-- Who canceled a charge (billing.cancel_charge), next to status_reason, which holds why.
alter table billing.charges
    add column canceled_by text check (canceled_by is null or btrim(canceled_by) <> '');

-- The largest ad-hoc charge finance may enqueue, per currency, in the currency's minor unit.
-- The row whose currency is null is the default for every currency without a row of its own;
-- `billingd run` keeps it equal to BILLING_ADHOC_CEILING. The other rows are edited in SQL by
-- the schema owner. The seeded rows put currencies whose minor unit is worth far less (or more)
-- than a cent near the default's value in US cents (about 10,000 USD); adjust them to taste.
create table billing.adhoc_limits (
    id         integer generated always as identity primary key,
    currency   text unique references billing.currencies (code),
    max_amount bigint not null check (max_amount > 0),
    updated_at timestamptz not null default now()
);
create unique index adhoc_limits_one_default on billing.adhoc_limits ((currency is null))
    where currency is null;

insert into billing.adhoc_limits (currency, max_amount) values
    (null,  1000000),       -- 10,000.00 in two-decimal currencies
    ('jpy', 1500000),       -- 1,500,000 yen
    ('krw', 14000000),      -- 14,000,000 won
    ('vnd', 250000000),
    ('clp', 9500000),
    ('pyg', 75000000),
    ('ugx', 37000000),
    ('idr', 16000000000),   -- 160,000,000.00 rupiah
    ('inr', 85000000),
    ('huf', 350000000),
    ('kwd', 3000000),       -- 3,000.000 dinar
    ('bhd', 3800000),
    ('omr', 3800000),
    ('jod', 7000000),
    ('tnd', 30000000);

-- billing.adhoc_ceiling returns the ceiling for a currency: its own row, or the default row.
-- Null when neither exists, which enqueue_charge treats as "no ad-hoc charges".
-- +goose StatementBegin
create function billing.adhoc_ceiling(currency text) returns bigint
language sql stable
set search_path = pg_catalog, pg_temp
as $$
    select l.max_amount
    from billing.adhoc_limits l
    where l.currency = adhoc_ceiling.currency or l.currency is null
    order by l.currency is null
    limit 1
$$;
-- +goose StatementEnd

-- billing.customer_currencies lists the currencies a customer is billed in: those of their
-- payment-method setups (a setup session that completed, or that one of their consents names),
-- their installment plans and their top-up rules. These are the currencies the customer has
-- seen and agreed to on a Checkout page or in a plan; an ad-hoc charge in any other currency is
-- refused (BD005), which also catches the costly typo of 5000 usd for 5000 jpy.
-- +goose StatementBegin
create function billing.customer_currencies(customer_id bigint) returns text[]
language sql stable
set search_path = pg_catalog, pg_temp
as $$
    select coalesce(array_agg(distinct x.currency order by x.currency), '{}')
    from (
        select s.currency from billing.setup_sessions s
        where s.customer_id = customer_currencies.customer_id
          and (s.status = 'completed'
               or exists (select 1 from billing.consents c
                          where c.customer_id = s.customer_id
                            and (c.setup_session_id = s.id or c.checkout_session_id = s.checkout_session_id)))
        union all
        select p.currency from billing.installment_plans p where p.customer_id = customer_currencies.customer_id
        union all
        select r.currency from billing.topup_rules r where r.customer_id = customer_currencies.customer_id
    ) x
$$;
-- +goose StatementEnd

-- billing.river_insert_channel is the channel River's producers LISTEN on for insert
-- notifications: "<schema of river_job>.river_insert" (riverpgxv5's Listener prefixes topics
-- with the connection's current_schema(), which is where rivermigrate created the tables).
-- Its search_path is set below to find River's tables.
-- +goose StatementBegin
create function billing.river_insert_channel() returns text
language sql stable
as $$
    select n.nspname || '.river_insert'
    from pg_catalog.pg_class c join pg_catalog.pg_namespace n on n.oid = c.relnamespace
    where c.oid = 'river_job'::pg_catalog.regclass
$$;
-- +goose StatementEnd

-- billing.enqueue_charge creates an ad-hoc charge and its River job in the caller's transaction
-- and wakes the charge workers, so that the PaymentIntent is created within a second of commit.
-- Amounts are in the currency's minor unit, as Stripe counts them (5000 usd is 50.00 USD,
-- 5000 jpy is 5,000 yen). The currency is case-insensitive. The same request_key returns the
-- same charge, also when two sessions race with it; the same key with other parameters is
-- refused (BD009). A NULL request_key always creates a new charge.
-- +goose StatementBegin
create function billing.enqueue_charge(
    customer_ref text,
    amount bigint,
    currency text,
    description text,
    requested_by text,
    request_key text default null
) returns bigint
language plpgsql
security definer
as $$
declare
    v_ref         text   := enqueue_charge.customer_ref;
    v_amount      bigint := enqueue_charge.amount;
    v_currency    text   := lower(btrim(enqueue_charge.currency));
    v_description text   := enqueue_charge.description;
    v_by          text   := enqueue_charge.requested_by;
    v_key         text   := enqueue_charge.request_key;
    v_customer    billing.customers;
    v_method      billing.payment_methods;
    v_currencies  text[];
    v_ceiling     bigint;
    v_exponent    smallint;
    v_id          bigint;
begin
    -- Arguments, in the order they are written.
    if v_ref is null or v_ref !~ '[^[:space:]]' then
        raise exception 'customer_ref is required'
            using errcode = 'BD001', hint = 'Pass the application''s reference of the customer, as in billing.report_charges.customer_ref.';
    end if;
    if v_amount is null then
        raise exception 'amount is required'
            using errcode = 'BD001', hint = 'Pass the amount in the currency''s minor unit: 5000 usd is 50.00 USD, 5000 jpy is 5,000 yen.';
    end if;
    if v_currency is null or v_currency !~ '[^[:space:]]' then
        raise exception 'currency is required'
            using errcode = 'BD001', hint = 'Pass a three-letter ISO currency code such as usd, eur or jpy.';
    end if;
    if v_description is null or v_description !~ '[^[:space:]]' then
        raise exception 'description is required'
            using errcode = 'BD001', hint = 'Say what the charge is for; the customer sees it on the payment.';
    end if;
    if length(v_description) > 1000 then
        raise exception 'description is % characters long; at most 1000 are allowed', length(v_description)
            using errcode = 'BD001', hint = 'Shorten the description.';
    end if;
    if v_by is null or v_by !~ '[^[:space:]]' then
        raise exception 'requested_by is required'
            using errcode = 'BD001', hint = 'Name the person who asked for the charge, for example an email address.';
    end if;
    if length(v_by) > 200 then
        raise exception 'requested_by is % characters long; at most 200 are allowed', length(v_by)
            using errcode = 'BD001', hint = 'Name the person who asked for the charge, for example an email address.';
    end if;
    if v_key is not null and (v_key !~ '[^[:space:]]' or length(v_key) > 200) then
        raise exception 'request_key must be NULL or 1 to 200 characters, not blank'
            using errcode = 'BD001', hint = 'Pass a key that identifies this request (a ticket number, a UUID), or NULL.';
    end if;

    -- A request seen before returns its charge, whatever has changed since it was accepted.
    if v_key is not null then
        v_id := billing.adhoc_charge_for_key(v_key, v_ref, v_amount, v_currency, v_description, v_by);
        if v_id is not null then
            return v_id;
        end if;
    end if;

    if v_amount <= 0 then
        raise exception 'amount must be positive, got %', v_amount
            using errcode = 'BD002', hint = 'Pass the amount in the currency''s minor unit: 5000 usd is 50.00 USD. Refunds are not made here.';
    end if;

    select c.exponent into v_exponent from billing.currencies c where c.code = v_currency;
    if not found then
        raise exception 'unknown currency "%"', enqueue_charge.currency
            using errcode = 'BD004', hint = 'Pass a three-letter ISO currency code that Stripe charges in (see billing.currencies), such as usd, eur or jpy.';
    end if;

    select * into v_customer from billing.customers c where c.customer_ref = v_ref;
    if not found then
        raise exception 'no customer with customer_ref "%"', v_ref
            using errcode = 'BD006', hint = 'Check the reference; a customer exists once the application has started their setup (billing.start_setup).';
    end if;

    if not exists (select 1 from billing.consents c
                   where c.customer_id = v_customer.id
                     and c.revoked_at is null
                     and c.accepted_at <= now()
                     and 'adhoc' = any (c.usage)) then
        raise exception 'customer "%" has no active consent to ad-hoc charges', v_ref
            using errcode = 'BD007',
                  detail = 'A charge is sent only under a consent whose usage includes adhoc and that is not revoked.',
                  hint = 'Ask the customer to save their payment method again for ad-hoc charges (billing.start_setup with usage adhoc).';
    end if;

    select * into v_method from billing.payment_methods m where m.id = v_customer.default_payment_method_id;
    if not found then
        raise exception 'customer "%" has no default payment method', v_ref
            using errcode = 'BD008', hint = 'Ask the customer to save a payment method (billing.start_setup).';
    end if;
    if v_method.status <> 'attached' then
        raise exception 'the default payment method of customer "%" is %', v_ref, v_method.status
            using errcode = 'BD008', hint = 'Ask the customer to save a new payment method (billing.start_setup).';
    end if;

    v_currencies := billing.customer_currencies(v_customer.id);
    if not v_currency = any (v_currencies) then
        raise exception 'customer "%" is not billed in %', v_ref, v_currency
            using errcode = 'BD005',
                  detail = case when cardinality(v_currencies) = 0
                                then 'No completed setup, installment plan or top-up rule of this customer names a currency.'
                                else 'The customer is billed in: ' || array_to_string(v_currencies, ', ') || '.' end,
                  hint = 'Charge in one of the customer''s currencies: those of their payment-method setups, installment plans and top-up rules.';
    end if;

    v_ceiling := billing.adhoc_ceiling(v_currency);
    if v_ceiling is null or v_amount > v_ceiling then
        raise exception 'amount % % is above the ad-hoc ceiling', v_amount, v_currency
            using errcode = 'BD003',
                  detail = case when v_ceiling is null then 'No ceiling is configured for ' || v_currency || ' and there is no default.'
                                else 'The ceiling for ' || v_currency || ' is ' || v_ceiling || ' (minor units).' end,
                  hint = 'Split the amount, or ask the database owner to raise the ceiling in billing.adhoc_limits.';
    end if;

    insert into billing.charges (customer_id, source, amount, currency, description, requested_by, request_key)
    values (v_customer.id, 'adhoc', v_amount, v_currency, v_description, v_by, v_key)
    on conflict on constraint charges_request_key_key do nothing
    returning id into v_id;

    if v_id is null then
        -- Another session inserted this key after our first look and has committed: return its
        -- charge if it is the same request.
        v_id := billing.adhoc_charge_for_key(v_key, v_ref, v_amount, v_currency, v_description, v_by);
        if v_id is null then
            -- Under REPEATABLE READ or SERIALIZABLE the committed row is outside our snapshot.
            raise exception 'request_key "%" was used by a concurrent transaction', v_key
                using errcode = 'serialization_failure', hint = 'Retry the transaction; it will return that charge.';
        end if;
        return v_id;
    end if;

    insert into river_job (args, kind, queue, max_attempts)
    values (pg_catalog.jsonb_build_object('charge_id', v_id), 'charge', 'charges', 25);

    perform pg_catalog.pg_notify(billing.river_insert_channel(),
                                 pg_catalog.json_build_object('queue', 'charges')::text);
    return v_id;
end
$$;
-- +goose StatementEnd

-- billing.adhoc_charge_for_key returns the ad-hoc charge that request_key created, or null when
-- there is none; it raises BD009 when that charge was created with other parameters.
-- +goose StatementBegin
create function billing.adhoc_charge_for_key(
    request_key text, customer_ref text, amount bigint, currency text, description text, requested_by text
) returns bigint
language plpgsql stable
set search_path = pg_catalog, pg_temp
as $$
declare
    v record;
begin
    select ch.id, ch.source, cu.customer_ref, ch.amount, ch.currency, ch.description, ch.requested_by
    into v
    from billing.charges ch join billing.customers cu on cu.id = ch.customer_id
    where ch.request_key = adhoc_charge_for_key.request_key;
    if not found then
        return null;
    end if;
    if v.source <> 'adhoc'
       or v.customer_ref is distinct from adhoc_charge_for_key.customer_ref
       or v.amount is distinct from adhoc_charge_for_key.amount
       or v.currency is distinct from adhoc_charge_for_key.currency
       or v.description is distinct from adhoc_charge_for_key.description
       or v.requested_by is distinct from adhoc_charge_for_key.requested_by then
        raise exception 'request_key "%" was already used for charge % with other parameters', adhoc_charge_for_key.request_key, v.id
            using errcode = 'BD009',
                  detail = format('Charge %s: customer %s, %s %s, description %L, requested by %s.',
                                  v.id, v.customer_ref, v.amount, v.currency, v.description, v.requested_by),
                  hint = 'Use a new request_key for a different charge, or repeat the original call exactly.';
    end if;
    return v.id;
end
$$;
-- +goose StatementEnd

-- billing.cancel_charge cancels a charge that has not been collected: pending, retry_scheduled or
-- recovering (billing.charge_transitions lists which states may become canceled). It records
-- why and who asked; the charge job finds the charge canceled and sends nothing. Canceling a
-- canceled charge changes nothing and succeeds, so a repeated call is harmless.
-- +goose StatementBegin
create function billing.cancel_charge(id bigint, reason text, requested_by text) returns void
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    v_id     bigint := cancel_charge.id;
    v_reason text   := cancel_charge.reason;
    v_by     text   := cancel_charge.requested_by;
    v_status text;
begin
    if v_id is null then
        raise exception 'id is required'
            using errcode = 'BD001', hint = 'Pass the charge id that billing.enqueue_charge returned (see billing.report_charges).';
    end if;
    if v_reason is null or v_reason !~ '[^[:space:]]' then
        raise exception 'reason is required'
            using errcode = 'BD001', hint = 'Say why the charge is canceled.';
    end if;
    if length(v_reason) > 1000 then
        raise exception 'reason is % characters long; at most 1000 are allowed', length(v_reason)
            using errcode = 'BD001', hint = 'Shorten the reason.';
    end if;
    if v_by is null or v_by !~ '[^[:space:]]' then
        raise exception 'requested_by is required'
            using errcode = 'BD001', hint = 'Name the person who asked for the cancellation, for example an email address.';
    end if;
    if length(v_by) > 200 then
        raise exception 'requested_by is % characters long; at most 200 are allowed', length(v_by)
            using errcode = 'BD001', hint = 'Name the person who asked for the cancellation, for example an email address.';
    end if;

    -- The row lock waits for a charge job that holds the charge, so the status read is final.
    select c.status into v_status from billing.charges c where c.id = v_id for update;
    if not found then
        raise exception 'no charge with id %', v_id
            using errcode = 'BD010', hint = 'See billing.report_charges for the charges and their ids.';
    end if;
    if v_status = 'canceled' then
        return;
    end if;
    if not exists (select 1 from billing.charge_transitions t
                   where t.from_status = v_status and t.to_status = 'canceled') then
        raise exception 'charge % is %, and only a charge not yet collected can be canceled', v_id, v_status
            using errcode = 'BD011',
                  detail = 'Pending, retry_scheduled and recovering charges can be canceled.',
                  hint = case v_status
                      when 'processing' then 'A payment attempt is in flight; wait for its outcome, then cancel if the charge is retried or in recovery.'
                      when 'succeeded' then 'The money was collected; refund it in Stripe instead.'
                      when 'recovered' then 'The customer paid through the recovery page; refund it in Stripe instead.'
                      when 'uncollectible' then 'The charge is already written off; nothing will be collected.'
                      else 'See billing.charge_transitions.' end;
    end if;

    update billing.charges c
    set status = 'canceled', status_reason = v_reason, canceled_by = v_by, next_attempt_at = null
    where c.id = v_id;
end
$$;
-- +goose StatementEnd

-- River's tables live in the schema that was current when rivermigrate ran, which is the one
-- current now (schema.Migrate runs both on the same connection settings). Pin it, with
-- pg_catalog first and pg_temp last, so that nothing a caller creates can shadow what the
-- functions use.
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
    execute format('alter function billing.river_insert_channel() set search_path = pg_catalog, %I, pg_temp', river_schema);
    execute format('alter function billing.enqueue_charge(text, bigint, text, text, text, text) set search_path = pg_catalog, %I, pg_temp', river_schema);
end
$$;
-- +goose StatementEnd

-- Reports. Views run with their owner's rights, so reading one needs SELECT on the view only.
-- They show no recovery tokens, no URLs, no email addresses and no Stripe payloads.

-- Every charge, for finding one (an id for cancel_charge) and for its status.
create view billing.report_charges as
select ch.id, cu.customer_ref, ch.source, ch.amount, ch.currency, cur.exponent, ch.description,
       ch.status, ch.status_reason, ch.attempt_count, ch.next_attempt_at, ch.payment_intent_id,
       ch.requested_by, ch.request_key, ch.canceled_by, ch.due_at, ch.created_at, ch.status_changed_at
from billing.charges ch
join billing.customers cu on cu.id = ch.customer_id
join billing.currencies cur on cur.code = ch.currency;

-- Charges created per day (UTC), by status, source and currency.
create view billing.report_charges_by_day as
select (ch.created_at at time zone 'UTC')::date as day, ch.status, ch.source, ch.currency,
       count(*) as charges, sum(ch.amount) as amount
from billing.charges ch
group by 1, 2, 3, 4;

-- Per currency: collected (succeeded, recovered), outstanding (pending, processing,
-- retry_scheduled, recovering), written off (uncollectible) and canceled, in minor units and in
-- major units (amount / 10^exponent).
create view billing.report_amounts_by_currency as
select x.currency, x.exponent,
       x.collected_charges, x.collected, round(x.collected / 10::numeric ^ x.exponent, x.exponent) as collected_major,
       x.outstanding_charges, x.outstanding, round(x.outstanding / 10::numeric ^ x.exponent, x.exponent) as outstanding_major,
       x.uncollectible_charges, x.uncollectible, x.canceled_charges, x.canceled
from (
    select ch.currency, cur.exponent,
           count(*) filter (where ch.status in ('succeeded', 'recovered')) as collected_charges,
           coalesce(sum(ch.amount) filter (where ch.status in ('succeeded', 'recovered')), 0) as collected,
           count(*) filter (where ch.status in ('pending', 'processing', 'retry_scheduled', 'recovering')) as outstanding_charges,
           coalesce(sum(ch.amount) filter (where ch.status in ('pending', 'processing', 'retry_scheduled', 'recovering')), 0) as outstanding,
           count(*) filter (where ch.status = 'uncollectible') as uncollectible_charges,
           coalesce(sum(ch.amount) filter (where ch.status = 'uncollectible'), 0) as uncollectible,
           count(*) filter (where ch.status = 'canceled') as canceled_charges,
           coalesce(sum(ch.amount) filter (where ch.status = 'canceled'), 0) as canceled
    from billing.charges ch
    join billing.currencies cur on cur.code = ch.currency
    group by ch.currency, cur.exponent
) x;

-- Recoveries: one row per charge that failed off-session, with its latest Checkout Session.
create view billing.report_recoveries as
select r.charge_id, cu.customer_ref, ch.amount, ch.currency, ch.status as charge_status,
       r.status, r.round, r.reason, r.reminders_sent, r.next_reminder_at, r.opened_at, r.closed_at,
       s.status as session_status, s.created_at as session_created_at,
       s.expires_at as session_expires_at, s.completed_at as session_completed_at
from billing.recoveries r
join billing.charges ch on ch.id = r.charge_id
join billing.customers cu on cu.id = ch.customer_id
left join lateral (
    select rs.status, rs.created_at, rs.expires_at, rs.completed_at
    from billing.recovery_sessions rs
    where rs.charge_id = r.charge_id
    order by rs.created_at desc, rs.id desc
    limit 1
) s on true;

-- Failed payment attempts (outcome declined or failed) by decline code, error code and currency:
-- how many attempts, how many distinct charges, and the amount of those charges.
create view billing.report_failures_by_decline_code as
select f.decline_code, f.error_code, f.outcome, f.currency,
       sum(f.attempts) as attempts, count(*) as charges, sum(f.amount) as amount,
       min(f.first_at) as first_at, max(f.last_at) as last_at
from (
    select a.decline_code, a.error_code, a.outcome, ch.currency, a.charge_id, ch.amount,
           count(*) as attempts,
           min(coalesce(a.finished_at, a.started_at)) as first_at,
           max(coalesce(a.finished_at, a.started_at)) as last_at
    from billing.charge_attempts a
    join billing.charges ch on ch.id = a.charge_id
    where a.outcome in ('declined', 'failed')
    group by a.decline_code, a.error_code, a.outcome, ch.currency, a.charge_id, ch.amount
) f
group by f.decline_code, f.error_code, f.outcome, f.currency;

-- The role. Roles belong to the whole server and several databases (test databases, staging
-- next to production) may share one, so an existing role is fine, including one created at
-- the same moment by another database's migration.
-- +goose StatementBegin
do $$
begin
    if not exists (select 1 from pg_catalog.pg_roles where rolname = 'billing_finance') then
        begin
            create role billing_finance nologin;
        exception
            when duplicate_object or unique_violation then
                null; -- created concurrently by another database's migration
            when insufficient_privilege then
                raise exception 'role billing_finance does not exist and % may not create it', current_user
                    using errcode = 'insufficient_privilege',
                          hint = 'Have a superuser (or a role with CREATEROLE) run: create role billing_finance nologin; then run billingd migrate again.';
        end;
    end if;
end
$$;
-- +goose StatementEnd

-- Functions are executable by PUBLIC unless revoked. Revoke that for every function in schema
-- billing (the foundation's, the other features', these), and by default for every function the
-- migrating role creates from now on, in any schema of this database (a per-schema default
-- cannot revoke a global grant). The schema owner keeps every right; other roles get exactly
-- what is granted to them.
revoke all on all routines in schema billing from public;
alter default privileges revoke execute on routines from public;
revoke all on schema billing from public;

grant usage on schema billing to billing_finance;
grant execute on function billing.enqueue_charge(text, bigint, text, text, text, text),
                          billing.cancel_charge(bigint, text, text)
    to billing_finance;
grant select on billing.report_charges, billing.report_charges_by_day, billing.report_amounts_by_currency,
                billing.report_recoveries, billing.report_failures_by_decline_code
    to billing_finance;

-- +goose Down
-- The role stays: other databases on the server may use it. This database's grants go.
revoke all on schema billing from billing_finance;
drop view billing.report_failures_by_decline_code, billing.report_recoveries,
          billing.report_amounts_by_currency, billing.report_charges_by_day, billing.report_charges;
drop function billing.cancel_charge(bigint, text, text);
drop function billing.enqueue_charge(text, bigint, text, text, text, text);
drop function billing.adhoc_charge_for_key(text, text, bigint, text, text, text);
drop function billing.river_insert_channel();
drop function billing.customer_currencies(bigint);
drop function billing.adhoc_ceiling(text);
drop table billing.adhoc_limits;
alter table billing.charges drop column canceled_by;
alter default privileges grant execute on routines to public;
grant execute on all routines in schema billing to public;
