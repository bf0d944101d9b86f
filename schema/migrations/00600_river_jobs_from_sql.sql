-- +goose Up
-- Every function that inserts a River job from SQL now finds River's table and its insert
-- channel the same way: in the schema River was migrated into, pinned in the function's
-- search_path at migration (as billing.enqueue_charge does since 00500), through the one helper
-- billing.river_insert_channel. billing.start_setup used the caller's current schema instead: an
-- application connecting with its own search_path (its own schema first) had its call fail
-- ("river_job does not exist") or notify a channel River does not listen on, so the setup waited
-- for River's next poll. The recovery trigger had a copy of the helper, billing.recovery_river_channel;
-- it goes.

-- billing.start_setup: as in 00400, but River's table and channel come from the pinned search_path.
-- +goose StatementBegin
create or replace function billing.start_setup(
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

    -- The start_setup job (jobs/start_setup.go), in River's table, picked up at once through
    -- River's insert notification.
    insert into river_job (args, kind, queue, max_attempts)
    values (jsonb_build_object('setup_session_id', v_session), 'start_setup', 'default', 10);
    perform pg_catalog.pg_notify(billing.river_insert_channel(), pg_catalog.json_build_object('queue', 'default')::text);

    return v_session;
end
$$;
-- +goose StatementEnd

-- +goose StatementBegin
create or replace function billing.charges_close_recovery() returns trigger
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
        perform pg_catalog.pg_notify(billing.river_insert_channel(), '{"queue":"default"}');
    end if;
    return null;
end
$$;
-- +goose StatementEnd

drop function billing.recovery_river_channel();

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
    execute format('alter function billing.start_setup(text, text, text, text, text) set search_path = pg_catalog, %I, pg_temp', river_schema);
    execute format('alter function billing.charges_close_recovery() set search_path = pg_catalog, %I, pg_temp', river_schema);
end
$$;
-- +goose StatementEnd

-- +goose Down
-- The definitions of 00300 and 00400 (create or replace resets start_setup's pinned search_path).
-- +goose StatementBegin
create function billing.recovery_river_channel() returns text
language sql stable
as $$
    select n.nspname || '.river_insert'
    from pg_catalog.pg_class c join pg_catalog.pg_namespace n on n.oid = c.relnamespace
    where c.oid = 'river_job'::pg_catalog.regclass
$$;
-- +goose StatementEnd

-- +goose StatementBegin
create or replace function billing.charges_close_recovery() returns trigger
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

-- +goose StatementBegin
create or replace function billing.start_setup(
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
