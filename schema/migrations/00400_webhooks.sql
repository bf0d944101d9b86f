-- +goose Up
-- Onboarding and webhooks (issue 7): the terms a customer accepts, billing.start_setup, the
-- billing_setup notification, and the columns that let ingest_event apply each Stripe event once
-- and in order.

-- The terms shown on the hosted setup page, by version. They are the four things Stripe requires
-- terms for off-session charges to cover; a consent copies them, so what the customer accepted is
-- kept with the consent. A version is never edited once written: publish a new version instead.
-- Together they must fit Checkout's custom text (1200 characters, joined by spaces).
create table billing.terms (
    version             text primary key check (btrim(version) <> '' and version = btrim(version)),
    agreement           text not null check (btrim(agreement) <> ''),
    timing              text not null check (btrim(timing) <> ''),
    amount_basis        text not null check (btrim(amount_basis) <> ''),
    cancellation_policy text not null check (btrim(cancellation_policy) <> ''),
    created_at          timestamptz not null default now(),
    check (char_length(agreement) + char_length(timing) + char_length(amount_basis)
           + char_length(cancellation_policy) + 3 <= 1200)
);

insert into billing.terms (version, agreement, timing, amount_basis, cancellation_policy) values (
    'v1',
    'I authorise the merchant to save this payment method and to charge it, without asking me each time, for the payments described here.',
    'Charges are made on the dates of my installment plan, when my prepaid balance falls below its threshold (top-up), or for one-off fees that I agreed to, as chosen when I signed up.',
    'Each charge is the installment amount of my plan, the top-up amount of my rule, or the amount of the agreed fee, in the currency of my account.',
    'I can withdraw this authorisation at any time from my account or by contacting support; charges already due before then remain payable.'
);

-- +goose StatementBegin
create function billing.terms_immutable() returns trigger
language plpgsql as $$
begin
    raise exception 'terms version % cannot be changed or deleted once published', old.version
        using errcode = 'check_violation',
              hint = 'Insert a new version into billing.terms and start new setups with it.';
end
$$;
-- +goose StatementEnd

create trigger terms_immutable before update or delete on billing.terms
    for each row execute function billing.terms_immutable();

-- The time of the newest Stripe event whose card details were applied to a method, so that an
-- older payment_method.automatically_updated delivered late changes nothing.
alter table billing.payment_methods add column card_updated_at timestamptz;

-- The setup session a consent was given through.
alter table billing.consents add column setup_session_id bigint references billing.setup_sessions (id);
create unique index consents_setup_session_key on billing.consents (setup_session_id)
    where setup_session_id is not null;

create index setup_sessions_customer_idx on billing.setup_sessions (customer_id);

-- A setup session shows published terms.
alter table billing.setup_sessions
    add constraint setup_sessions_terms_version_fkey foreign key (terms_version) references billing.terms (version);

-- An event of another API version family than the one stripe-go v82 pins is accepted, stored
-- and flagged here (see the README): never dropped silently.
alter table billing.webhook_events
    add column api_version_mismatch boolean not null default false,
    add column object_id text;
create index webhook_events_object_idx on billing.webhook_events (object_id);

-- billing_setup: every change of a setup session's status is announced in its own transaction,
-- so that the application (or `billingd setup`) can redirect the customer as soon as the hosted
-- page exists ("open") and learn when the method is saved ("completed").
-- +goose StatementBegin
create function billing.setup_sessions_notify() returns trigger
language plpgsql as $$
begin
    if new.status is distinct from old.status then
        perform pg_notify('billing_setup', json_build_object(
            'setup_session_id', new.id,
            'customer_ref', (select c.customer_ref from billing.customers c where c.id = new.customer_id),
            'status', new.status,
            'url', new.url,
            'expires_at', new.expires_at,
            'error', new.last_error)::text);
    end if;
    return null;
end
$$;
-- +goose StatementEnd

create trigger setup_sessions_notify after update of status on billing.setup_sessions
    for each row execute function billing.setup_sessions_notify();

-- billing.start_setup begins saving a payment method for a customer: it checks its input, creates
-- or updates the customer, records a setup session ('creating') and inserts the start_setup job
-- that creates the hosted Checkout Session, all in the caller's transaction. It returns the setup
-- session id; the URL arrives in billing.setup_sessions and on channel billing_setup.
--
-- usage is 'installments', 'topups' or 'adhoc', or several of them separated by commas.
-- Bad input raises SQLSTATE 22023 (invalid_parameter_value) with a HINT, and writes nothing.
-- The function has no fixed search_path on purpose: River's table and its notification channel
-- are those of the caller's current schema, as River's own clients use them.
-- +goose StatementBegin
create function billing.start_setup(
    customer_ref  text,
    email         text,
    usage         text,
    terms_version text,
    currency      text default 'usd'
) returns bigint
language plpgsql as $$
#variable_conflict use_column
declare
    v_ref      text := btrim(start_setup.customer_ref);
    v_email    text := btrim(start_setup.email);
    v_version  text := btrim(start_setup.terms_version);
    v_currency text := lower(btrim(start_setup.currency));
    v_parts    text[];
    v_usage    text[];
    v_customer bigint;
    v_session  bigint;
begin
    if v_ref is null or v_ref = '' then
        raise exception 'customer_ref is required'
            using errcode = 'invalid_parameter_value',
                  hint = 'Pass the application''s own reference for the customer, e.g. ''user-42''.';
    end if;
    if char_length(v_ref) > 255 then
        raise exception 'customer_ref is longer than 255 characters'
            using errcode = 'invalid_parameter_value',
                  hint = 'Use a shorter reference, such as the application''s user id.';
    end if;
    if v_email is null or v_email = '' then
        raise exception 'email is required'
            using errcode = 'invalid_parameter_value',
                  hint = 'Pass the customer''s email address; Stripe sends receipts to it.';
    end if;
    if char_length(v_email) > 254 or v_email !~ '^[^@[:space:][:cntrl:]]+@[^@[:space:][:cntrl:].]+(\.[^@[:space:][:cntrl:].]+)+$' then
        raise exception 'email % is not a valid address', quote_literal(v_email)
            using errcode = 'invalid_parameter_value',
                  hint = 'Pass an address like ''name@example.com''.';
    end if;
    if start_setup.usage is null or btrim(start_setup.usage) = '' then
        raise exception 'usage is required'
            using errcode = 'invalid_parameter_value',
                  hint = 'Pass ''installments'', ''topups'' or ''adhoc'', or several separated by commas, e.g. ''installments,adhoc''.';
    end if;
    select array_agg(lower(btrim(u))) into v_parts from unnest(string_to_array(start_setup.usage, ',')) as u;
    if exists (select 1 from unnest(v_parts) p where p = '') then
        raise exception 'usage % has an empty item', quote_literal(start_setup.usage)
            using errcode = 'invalid_parameter_value',
                  hint = 'Separate the uses with single commas, e.g. ''installments,adhoc''.';
    end if;
    if exists (select 1 from unnest(v_parts) p where p <> all (array['installments', 'topups', 'adhoc'])) then
        raise exception 'usage % names an unknown use: %', quote_literal(start_setup.usage),
                (select string_agg(p, ', ') from unnest(v_parts) p where p <> all (array['installments', 'topups', 'adhoc']))
            using errcode = 'invalid_parameter_value',
                  hint = 'The uses are ''installments'', ''topups'' and ''adhoc''.';
    end if;
    -- Canonical order, each use once.
    select array_agg(k order by o) into v_usage
    from unnest(array['installments', 'topups', 'adhoc']) with ordinality as known(k, o)
    where k = any (v_parts);

    if v_version is null or v_version = '' then
        raise exception 'terms_version is required'
            using errcode = 'invalid_parameter_value',
                  hint = 'Pass the version of the terms the customer is shown, a row of billing.terms, e.g. ''v1''.';
    end if;
    if not exists (select 1 from billing.terms t where t.version = v_version) then
        raise exception 'terms_version % is not in billing.terms', quote_literal(v_version)
            using errcode = 'invalid_parameter_value',
                  hint = 'Known versions: ' || coalesce((select string_agg(t.version, ', ' order by t.created_at) from billing.terms t), 'none')
                         || '. Publish new terms by inserting a row into billing.terms.';
    end if;
    if v_currency is null or not exists (select 1 from billing.currencies c where c.code = v_currency) then
        raise exception 'currency % is not a currency that Stripe charges in', coalesce(quote_literal(start_setup.currency), 'null')
            using errcode = 'invalid_parameter_value',
                  hint = 'Pass a three-letter ISO code listed in billing.currencies, e.g. ''usd''.';
    end if;

    insert into billing.customers as c (customer_ref, email)
    values (v_ref, v_email)
    on conflict (customer_ref) do update
        set email = excluded.email,
            updated_at = case when c.email is distinct from excluded.email then now() else c.updated_at end
    returning c.id into v_customer;

    insert into billing.setup_sessions (customer_id, usage, terms_version, currency)
    values (v_customer, v_usage, v_version, v_currency)
    returning id into v_session;

    -- The start_setup job (jobs/start_setup.go), picked up at once through River's insert
    -- notification.
    insert into river_job (args, kind, queue, max_attempts)
    values (jsonb_build_object('setup_session_id', v_session), 'start_setup', 'default', 10);
    perform pg_notify(current_schema() || '.river_insert', json_build_object('queue', 'default')::text);

    return v_session;
end
$$;
-- +goose StatementEnd

comment on function billing.start_setup(text, text, text, text, text) is
    'Begin saving a payment method: returns the setup session id; the hosted URL appears in billing.setup_sessions and on NOTIFY channel billing_setup.';

-- billing.set_stripe_account links a customer to its customer-configured Stripe Account
-- (Accounts v2), for BILLING_STRIPE_CUSTOMER_MODEL=account: billingd cannot create Accounts
-- (stripe-go v82 has no Accounts v2 API), so the application creates the Account and links it
-- here, before or after billing.start_setup. It creates the customer when needed and returns its
-- id. An Account already linked to another customer, or a different Account already linked to
-- this one, is refused (22023): Stripe objects are never silently re-pointed.
-- +goose StatementBegin
create function billing.set_stripe_account(customer_ref text, stripe_account_id text) returns bigint
language plpgsql as $$
#variable_conflict use_column
declare
    v_ref      text := btrim(set_stripe_account.customer_ref);
    v_acct     text := btrim(set_stripe_account.stripe_account_id);
    v_customer bigint;
    v_current  text;
begin
    if v_ref is null or v_ref = '' then
        raise exception 'customer_ref is required'
            using errcode = 'invalid_parameter_value',
                  hint = 'Pass the application''s own reference for the customer, e.g. ''user-42''.';
    end if;
    if v_acct is null or v_acct !~ '^acct_[A-Za-z0-9]+$' then
        raise exception 'stripe_account_id % is not a Stripe Account id', coalesce(quote_literal(set_stripe_account.stripe_account_id), 'null')
            using errcode = 'invalid_parameter_value',
                  hint = 'Pass the id of the customer-configured Account, like ''acct_1Nv0FGQ9RKHgCVdK''.';
    end if;
    insert into billing.customers as c (customer_ref) values (v_ref)
    on conflict (customer_ref) do update set updated_at = c.updated_at
    returning c.id, c.stripe_account_id into v_customer, v_current;
    if v_current = v_acct then
        return v_customer;
    end if;
    if v_current is not null then
        raise exception 'customer % is already linked to another Stripe Account', quote_literal(v_ref)
            using errcode = 'invalid_parameter_value',
                  hint = 'A customer''s Account is not replaced; use a new customer_ref for another Account.';
    end if;
    if exists (select 1 from billing.customers c where c.stripe_account_id = v_acct) then
        raise exception 'Stripe Account % is already linked to another customer', v_acct
            using errcode = 'invalid_parameter_value',
                  hint = 'One Account belongs to one customer.';
    end if;
    update billing.customers set stripe_account_id = v_acct, updated_at = now() where id = v_customer;
    return v_customer;
end
$$;
-- +goose StatementEnd

-- +goose Down
drop function billing.set_stripe_account(text, text);
drop function billing.start_setup(text, text, text, text, text);
drop trigger setup_sessions_notify on billing.setup_sessions;
drop function billing.setup_sessions_notify();
drop index billing.webhook_events_object_idx;
alter table billing.webhook_events drop column object_id, drop column api_version_mismatch;
alter table billing.setup_sessions drop constraint setup_sessions_terms_version_fkey;
drop index billing.setup_sessions_customer_idx;
drop index billing.consents_setup_session_key;
alter table billing.consents drop column setup_session_id;
alter table billing.payment_methods drop column card_updated_at;
drop table billing.terms;
drop function billing.terms_immutable();
