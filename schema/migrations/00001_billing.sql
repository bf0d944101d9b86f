-- +goose Up
-- Billing's own tables, in schema billing. River's tables live beside them (rivermigrate).
-- The database enforces what must never be false: positive amounts, ISO currencies,
-- valid states and transitions, one charge per plan period, foreign keys.

create schema if not exists billing;

-- ISO 4217 currencies that Stripe charges in, with their minor-unit exponent as Stripe
-- counts amounts (JPY and KRW are zero-decimal; BHD, JOD, KWD, OMR, TND three-decimal).
-- internal/money holds the same table; a test keeps the two equal.
create table billing.currencies (
    code     text primary key check (code ~ '^[a-z]{3}$'),
    exponent smallint not null check (exponent in (0, 2, 3))
);

insert into billing.currencies (code, exponent) values
    ('aed',2),('afn',2),('all',2),('amd',2),('ang',2),('aoa',2),('ars',2),('aud',2),('awg',2),('azn',2),
    ('bam',2),('bbd',2),('bdt',2),('bgn',2),('bhd',3),('bif',0),('bmd',2),('bnd',2),('bob',2),('brl',2),
    ('bsd',2),('bwp',2),('byn',2),('bzd',2),('cad',2),('cdf',2),('chf',2),('clp',0),('cny',2),('cop',2),
    ('crc',2),('cve',2),('czk',2),('djf',0),('dkk',2),('dop',2),('dzd',2),('egp',2),('etb',2),('eur',2),
    ('fjd',2),('fkp',2),('gbp',2),('gel',2),('gip',2),('gmd',2),('gnf',0),('gtq',2),('gyd',2),('hkd',2),
    ('hnl',2),('htg',2),('huf',2),('idr',2),('ils',2),('inr',2),('isk',2),('jmd',2),('jod',3),('jpy',0),
    ('kes',2),('kgs',2),('khr',2),('kmf',0),('krw',0),('kwd',3),('kyd',2),('kzt',2),('lak',2),('lbp',2),
    ('lkr',2),('lrd',2),('lsl',2),('mad',2),('mdl',2),('mga',0),('mkd',2),('mmk',2),('mnt',2),('mop',2),
    ('mur',2),('mvr',2),('mwk',2),('mxn',2),('myr',2),('mzn',2),('nad',2),('ngn',2),('nio',2),('nok',2),
    ('npr',2),('nzd',2),('omr',3),('pab',2),('pen',2),('pgk',2),('php',2),('pkr',2),('pln',2),('pyg',0),
    ('qar',2),('ron',2),('rsd',2),('rub',2),('rwf',0),('sar',2),('sbd',2),('scr',2),('sek',2),('sgd',2),
    ('shp',2),('sle',2),('sos',2),('srd',2),('std',2),('szl',2),('thb',2),('tjs',2),('tnd',3),('top',2),
    ('try',2),('ttd',2),('twd',2),('tzs',2),('uah',2),('ugx',0),('usd',2),('uyu',2),('uzs',2),('vnd',0),
    ('vuv',0),('wst',2),('xaf',0),('xcd',2),('xof',0),('xpf',0),('yer',2),('zar',2),('zmw',2);

-- Customers are named by the host application's own reference.
create table billing.customers (
    id                        bigint generated always as identity primary key,
    customer_ref              text not null unique check (btrim(customer_ref) <> ''),
    email                     text check (email is null or email like '%_@_%'),
    stripe_customer_id        text unique check (stripe_customer_id like 'cus\_%'),
    -- Accounts v2 (customer-configured Account); sent with AddExtra since stripe-go v82 has no field.
    stripe_account_id         text unique check (stripe_account_id like 'acct\_%'),
    default_payment_method_id bigint,
    created_at                timestamptz not null default now(),
    updated_at                timestamptz not null default now()
);

create table billing.payment_methods (
    id                       bigint generated always as identity primary key,
    customer_id              bigint not null references billing.customers (id),
    stripe_payment_method_id text not null unique check (stripe_payment_method_id like 'pm\_%'),
    type                     text not null default 'card',
    brand                    text,
    last4                    text check (last4 is null or last4 ~ '^[0-9]{4}$'),
    exp_month                smallint check (exp_month between 1 and 12),
    exp_year                 smallint check (exp_year between 2000 and 2200),
    fingerprint              text,
    status                   text not null default 'attached' check (status in ('attached', 'detached')),
    created_at               timestamptz not null default now(),
    detached_at              timestamptz,
    check ((status = 'detached') = (detached_at is not null)),
    unique (id, customer_id)
);

-- The default method must belong to the same customer.
alter table billing.customers
    add constraint customers_default_payment_method_fkey
    foreign key (default_payment_method_id, id) references billing.payment_methods (id, customer_id)
    deferrable initially deferred;

-- A consent records the customer's agreement to off-session charges: the four things Stripe's
-- terms must cover (the agreement, timing and frequency, how the amount is determined, the
-- cancellation policy), for which uses, under which terms version, and where it was given.
create table billing.consents (
    id                  bigint generated always as identity primary key,
    customer_id         bigint not null references billing.customers (id),
    payment_method_id   bigint references billing.payment_methods (id),
    usage               text[] not null check (
                            cardinality(usage) > 0
                            and usage <@ array['installments', 'topups', 'adhoc']::text[]),
    terms_version       text not null check (btrim(terms_version) <> ''),
    agreement           text not null check (btrim(agreement) <> ''),
    timing              text not null check (btrim(timing) <> ''),
    amount_basis        text not null check (btrim(amount_basis) <> ''),
    cancellation_policy text not null check (btrim(cancellation_policy) <> ''),
    checkout_session_id text,
    setup_intent_id     text,
    accepted_at         timestamptz not null,
    revoked_at          timestamptz,
    created_at          timestamptz not null default now(),
    check (revoked_at is null or revoked_at >= accepted_at)
);
create unique index consents_checkout_session_key on billing.consents (checkout_session_id)
    where checkout_session_id is not null;
create index consents_customer_idx on billing.consents (customer_id) where revoked_at is null;

-- Hosted Checkout Sessions in mode=setup that save a payment method.
create table billing.setup_sessions (
    id                  bigint generated always as identity primary key,
    customer_id         bigint not null references billing.customers (id),
    usage               text[] not null check (
                            cardinality(usage) > 0
                            and usage <@ array['installments', 'topups', 'adhoc']::text[]),
    terms_version       text not null check (btrim(terms_version) <> ''),
    currency            text not null references billing.currencies (code),
    status              text not null default 'creating'
                            check (status in ('creating', 'open', 'completed', 'expired', 'failed')),
    checkout_session_id text unique check (checkout_session_id like 'cs\_%'),
    url                 text,
    expires_at          timestamptz,
    last_error          text,
    created_at          timestamptz not null default now(),
    completed_at        timestamptz,
    check (status in ('creating', 'failed') or (checkout_session_id is not null and url is not null))
);

create table billing.installment_plans (
    id                    bigint generated always as identity primary key,
    customer_id           bigint not null references billing.customers (id),
    description           text not null check (btrim(description) <> ''),
    total_amount          bigint not null check (total_amount > 0),
    currency              text not null references billing.currencies (code),
    installment_count     integer not null check (installment_count between 1 and 1000),
    -- Which installment takes the remainder when the total does not divide evenly.
    remainder_installment text not null default 'first' check (remainder_installment in ('first', 'last')),
    -- A robfig/cron expression (CRON_TZ= allowed) or a monthly anchor day clamped to month end.
    schedule_kind         text not null check (schedule_kind in ('cron', 'monthly')),
    cron_expr             text,
    anchor_day            smallint check (anchor_day between 1 and 31),
    time_zone             text not null default 'UTC',
    starts_at             timestamptz not null,
    next_installment      integer not null default 1 check (next_installment >= 1),
    next_due_at           timestamptz,
    status                text not null default 'active'
                              check (status in ('active', 'paused', 'completed', 'canceled')),
    created_at            timestamptz not null default now(),
    updated_at            timestamptz not null default now(),
    check (total_amount >= installment_count),
    check ((schedule_kind = 'cron') = (cron_expr is not null)),
    check ((schedule_kind = 'monthly') = (anchor_day is not null)),
    check (next_installment <= installment_count + 1),
    check ((status = 'active') <= (next_due_at is not null))
);
create index installment_plans_due_idx on billing.installment_plans (next_due_at) where status = 'active';

create table billing.topup_rules (
    id                bigint generated always as identity primary key,
    customer_id       bigint not null references billing.customers (id),
    description       text not null check (btrim(description) <> ''),
    currency          text not null references billing.currencies (code),
    -- 'threshold': fires when the balance falls below threshold_amount; charges up to target_amount
    -- or a fixed_amount. 'scheduled': a fixed_amount on a cron schedule.
    kind              text not null check (kind in ('threshold', 'scheduled')),
    threshold_amount  bigint check (threshold_amount >= 0),
    target_amount     bigint check (target_amount > 0),
    fixed_amount      bigint check (fixed_amount > 0),
    cron_expr         text,
    cooldown          interval not null default '1 hour' check (cooldown >= interval '0'),
    max_per_period    integer check (max_per_period > 0),
    cap_period        interval not null default '1 day' check (cap_period > interval '0'),
    next_due_at       timestamptz,
    fired_count       bigint not null default 0,
    last_fired_at     timestamptz,
    status            text not null default 'active' check (status in ('active', 'paused', 'canceled')),
    created_at        timestamptz not null default now(),
    updated_at        timestamptz not null default now(),
    check (kind <> 'threshold' or (threshold_amount is not null
           and (target_amount is not null) <> (fixed_amount is not null)
           and (target_amount is null or target_amount > threshold_amount))),
    check (kind <> 'scheduled' or (cron_expr is not null and fixed_amount is not null))
);

-- Charges: one row per amount due. A charge moves through the states of DESIGN.md; the trigger
-- below refuses any transition not listed in billing.charge_transitions.
create table billing.charges (
    id                bigint generated always as identity primary key,
    customer_id       bigint not null references billing.customers (id),
    source            text not null check (source in ('installment', 'topup', 'adhoc')),
    source_id         bigint,
    -- The period this charge is for within its source (installment number, top-up sequence);
    -- null for ad-hoc charges, whose uniqueness comes from request_key.
    period            text check (period is null or btrim(period) <> ''),
    amount            bigint not null check (amount > 0),
    currency          text not null references billing.currencies (code),
    description       text not null check (btrim(description) <> ''),
    status            text not null default 'pending' check (status in (
                          'pending', 'processing', 'succeeded', 'retry_scheduled',
                          'recovering', 'recovered', 'uncollectible', 'canceled')),
    status_reason     text,
    due_at            timestamptz not null default now(),
    attempt_count     integer not null default 0 check (attempt_count >= 0),
    next_attempt_at   timestamptz,
    payment_method_id bigint references billing.payment_methods (id),
    payment_intent_id text check (payment_intent_id like 'pi\_%'),
    requested_by      text check (requested_by is null or btrim(requested_by) <> ''),
    request_key       text unique check (request_key is null or btrim(request_key) <> ''),
    created_at        timestamptz not null default now(),
    updated_at        timestamptz not null default now(),
    status_changed_at timestamptz not null default now(),
    check ((source = 'adhoc') = (source_id is null)),
    check ((source = 'adhoc') = (period is null)),
    check (source <> 'adhoc' or requested_by is not null),
    check ((status = 'retry_scheduled') <= (next_attempt_at is not null)),
    unique (source, source_id, period)
);
create index charges_customer_idx on billing.charges (customer_id);
create index charges_open_status_idx on billing.charges (status)
    where status not in ('succeeded', 'recovered', 'uncollectible', 'canceled');

create table billing.charge_transitions (
    from_status text not null,
    to_status   text not null,
    primary key (from_status, to_status)
);
insert into billing.charge_transitions (from_status, to_status) values
    ('pending', 'processing'),
    ('pending', 'recovering'),        -- checks failed before any call: the customer pays on-session
    ('pending', 'canceled'),
    ('processing', 'succeeded'),
    ('processing', 'retry_scheduled'),
    ('processing', 'recovering'),
    ('processing', 'recovered'),      -- the recovery page was paid while an attempt was in flight
    ('retry_scheduled', 'processing'),
    ('retry_scheduled', 'recovering'),
    ('retry_scheduled', 'recovered'),
    ('retry_scheduled', 'canceled'),
    ('retry_scheduled', 'uncollectible'),
    ('recovering', 'recovered'),
    ('recovering', 'uncollectible'),
    ('recovering', 'canceled'),
    ('uncollectible', 'recovered');   -- money that arrives late is still money

-- +goose StatementBegin
create function billing.charges_guard_transition() returns trigger
language plpgsql as $$
begin
    if new.status is distinct from old.status then
        if not exists (select 1 from billing.charge_transitions t
                       where t.from_status = old.status and t.to_status = new.status) then
            raise exception 'charge %: transition from % to % is not allowed', old.id, old.status, new.status
                using errcode = 'check_violation',
                      hint = 'See billing.charge_transitions for the allowed state changes.';
        end if;
        new.status_changed_at := now();
    end if;
    if new.amount is distinct from old.amount or new.currency is distinct from old.currency
       or new.customer_id is distinct from old.customer_id then
        raise exception 'charge %: amount, currency and customer are fixed once created', old.id
            using errcode = 'check_violation',
                  hint = 'Cancel the charge and create a new one.';
    end if;
    new.updated_at := now();
    return new;
end
$$;
-- +goose StatementEnd

create trigger charges_guard_transition before update on billing.charges
    for each row execute function billing.charges_guard_transition();

-- Every call to Stripe that may move money for a charge. An attempt is written before the call;
-- its idempotency key is reused by transient retries and never by a new attempt.
create table billing.charge_attempts (
    id                    bigint generated always as identity primary key,
    charge_id             bigint not null references billing.charges (id),
    attempt_no            integer not null check (attempt_no >= 1),
    idempotency_key       text not null unique check (btrim(idempotency_key) <> ''),
    payment_method_id     bigint references billing.payment_methods (id),
    outcome               text not null default 'in_flight' check (outcome in (
                              'in_flight', 'succeeded', 'declined', 'failed', 'unknown')),
    tries                 integer not null default 0 check (tries >= 0),
    http_status           integer,
    error_type            text,
    error_code            text,
    decline_code          text,
    payment_intent_id     text,
    payment_intent_status text,
    stripe_request_id     text,
    started_at            timestamptz not null default now(),
    last_try_at           timestamptz,
    finished_at           timestamptz,
    duration_ms           integer check (duration_ms >= 0),
    unique (charge_id, attempt_no),
    check (outcome in ('in_flight', 'unknown') or finished_at is not null)
);

-- Recovery: one per charge that failed off-session. The token is what the customer's link
-- carries (/recover/{token}); it outlives the Checkout Sessions it leads to.
create table billing.recoveries (
    charge_id        bigint primary key references billing.charges (id),
    token            text not null unique check (length(token) >= 32),
    round            integer not null default 1 check (round >= 1),
    reason           text not null,
    status           text not null default 'open' check (status in ('open', 'paid', 'closed', 'uncollectible')),
    reminders_sent   integer not null default 0 check (reminders_sent >= 0),
    next_reminder_at timestamptz,
    opened_at        timestamptz not null default now(),
    closed_at        timestamptz,
    check ((status = 'open') = (closed_at is null))
);

create table billing.recovery_sessions (
    id                  bigint generated always as identity primary key,
    charge_id           bigint not null references billing.recoveries (charge_id),
    round               integer not null check (round >= 1),
    checkout_session_id text not null unique check (checkout_session_id like 'cs\_%'),
    url                 text not null,
    expires_at          timestamptz not null,
    status              text not null default 'open' check (status in ('open', 'completed', 'expired')),
    payment_intent_id   text,
    created_at          timestamptz not null default now(),
    completed_at        timestamptz
);
create unique index recovery_sessions_one_open on billing.recovery_sessions (charge_id) where status = 'open';

-- Notifications outbox: written in the transaction that decides to notify, delivered by a job.
create table billing.notifications (
    id           bigint generated always as identity primary key,
    customer_id  bigint not null references billing.customers (id),
    charge_id    bigint references billing.charges (id),
    channel      text not null check (channel in ('email', 'webhook')),
    kind         text not null check (kind in ('recovery', 'reminder', 'setup', 'receipt')),
    recipient    text not null check (btrim(recipient) <> ''),
    subject      text not null,
    body         text not null,
    payload      jsonb not null default '{}',
    dedupe_key   text not null unique,
    status       text not null default 'pending' check (status in ('pending', 'sent', 'failed')),
    attempts     integer not null default 0 check (attempts >= 0),
    last_error   text,
    created_at   timestamptz not null default now(),
    sent_at      timestamptz,
    check ((status = 'sent') = (sent_at is not null))
);

-- Stripe events, stored once by id, in the transaction that enqueues their ingestion.
create table billing.webhook_events (
    id           text primary key check (id like 'evt\_%'),
    type         text not null check (btrim(type) <> ''),
    api_version  text,
    livemode     boolean not null default false,
    created      timestamptz not null,
    payload      jsonb not null,
    status       text not null default 'received'
                     check (status in ('received', 'processed', 'ignored', 'unknown_object', 'failed')),
    note         text,
    received_at  timestamptz not null default now(),
    processed_at timestamptz,
    check ((status = 'received') = (processed_at is null))
);
create index webhook_events_unprocessed_idx on billing.webhook_events (received_at) where status = 'received';

-- +goose Down
drop schema billing cascade;
