-- +goose Up
-- The due computation (issue 4): the SQL API that creates and cancels installment plans and
-- top-up rules, the balances table that threshold top-ups read, the monthly calendar rule, and
-- the indexes the periodic job scans. What is due lives here; the job only acts on it.

-- A cron plan or rule starts in 'schedule_pending': cron expressions are evaluated in Go, so the
-- due job computes the first due date (and marks the row 'invalid', with a reason, when the
-- expression cannot be used) instead of retrying it forever.
alter table billing.installment_plans
    drop constraint installment_plans_status_check,
    add constraint installment_plans_status_check check (status in (
        'schedule_pending', 'active', 'paused', 'completed', 'canceled', 'invalid')),
    add column status_reason text,
    add column canceled_at   timestamptz,
    add column request_key   text check (request_key is null or btrim(request_key) <> ''),
    -- Monthly plans: the local month of installment 1 and the local time of day of every
    -- installment, derived from starts_at by a trigger (below) so that each next due date is a
    -- cheap expression.
    add column first_month   date,
    add column due_time      time,
    add constraint installment_plans_canceled_check check (canceled_at is null or status = 'canceled'),
    add constraint installment_plans_invalid_check check (status <> 'invalid' or status_reason is not null);

-- A request_key names one plan or rule. Partial: rows without one (most) cost no index entry
-- on each update of the due computation.
create unique index installment_plans_request_key_key on billing.installment_plans (request_key) where request_key is not null;

-- The due scan walks (next_due_at, id) in order, batch after batch.
drop index billing.installment_plans_due_idx;
create index installment_plans_due_idx on billing.installment_plans (next_due_at, id) where status = 'active';
create index installment_plans_pending_idx on billing.installment_plans (id) where status = 'schedule_pending';

alter table billing.topup_rules
    drop constraint topup_rules_status_check,
    add constraint topup_rules_status_check check (status in (
        'schedule_pending', 'active', 'paused', 'canceled', 'invalid')),
    -- The zone a scheduled rule's cron expression is read in (CRON_TZ= in the expression wins).
    add column time_zone     text not null default 'UTC',
    add column status_reason text,
    add column canceled_at   timestamptz,
    add column request_key   text check (request_key is null or btrim(request_key) <> ''),
    add constraint topup_rules_canceled_check check (canceled_at is null or status = 'canceled'),
    add constraint topup_rules_invalid_check check (status <> 'invalid' or status_reason is not null),
    add constraint topup_rules_scheduled_due_check check (kind <> 'scheduled' or (status = 'active') <= (next_due_at is not null));

create unique index topup_rules_request_key_key on billing.topup_rules (request_key) where request_key is not null;
create index topup_rules_threshold_idx on billing.topup_rules (id) where kind = 'threshold' and status = 'active';
create index topup_rules_scheduled_due_idx on billing.topup_rules (next_due_at, id) where kind = 'scheduled' and status = 'active';
create index topup_rules_pending_idx on billing.topup_rules (id) where status = 'schedule_pending';

-- At most one open top-up per rule, and the cap per period, are checked against a rule's charges.
create index charges_topup_open_idx on billing.charges (source_id)
    where source = 'topup' and status not in ('succeeded', 'recovered', 'uncollectible', 'canceled');
create index charges_topup_due_idx on billing.charges (source_id, due_at) where source = 'topup';

-- The customer's balance per currency, in minor units, kept by the host application (it credits
-- a top-up when its charge succeeds and debits usage). Threshold top-up rules read it: a rule
-- fires when amount < threshold_amount. billing.set_balance is a convenience for writing it.
create table billing.balances (
    customer_id bigint not null references billing.customers (id),
    currency    text not null references billing.currencies (code),
    amount      bigint not null,
    updated_at  timestamptz not null default now(),
    primary key (customer_id, currency)
);

-- IANA time zone names that plans and rules may use. pg_timezone_names is read once here because
-- it scans the zone database on every query (about 0.1 s); a name missing here (a zone added by
-- a later tzdata) is looked up there. Names that mean "the server's zone" are left out.
create table billing.time_zones (name text primary key);
insert into billing.time_zones (name)
    select name from pg_timezone_names where name not in ('localtime', 'posixrules', 'Factory');

-- +goose StatementBegin
create function billing.is_time_zone(name text) returns boolean
language plpgsql stable parallel safe as $$
begin
    if exists (select 1 from billing.time_zones z where z.name = is_time_zone.name) then
        return true;
    end if;
    return exists (select 1 from pg_timezone_names z where z.name = is_time_zone.name
                   and z.name not in ('localtime', 'posixrules', 'Factory'));
end
$$;
-- +goose StatementEnd

-- +goose StatementBegin
-- The zone named by a cron expression's CRON_TZ= (or TZ=) prefix, or null.
create function billing.cron_expr_zone(expr text) returns text
language sql immutable parallel safe as $$
    select (regexp_match(btrim(expr), '^(?:CRON_)?TZ=(\S+)'))[1]
$$;
-- +goose StatementEnd

-- +goose StatementBegin
-- The value of one token of a cron field: a number, or a month or weekday name (robfig's names).
create function billing.cron_field_value(token text, field integer) returns integer
language sql immutable parallel safe as $$
    select case
        when token ~ '^[0-9]{1,4}$' then token::integer
        when field = 4 then array_position(array['jan','feb','mar','apr','may','jun','jul','aug','sep','oct','nov','dec'], token)
        when field = 5 then array_position(array['sun','mon','tue','wed','thu','fri','sat'], token) - 1
    end
$$;
-- +goose StatementEnd

-- +goose StatementBegin
-- Checks a cron expression in robfig/cron's standard syntax (what cron.ParseStandard accepts:
-- five fields or a descriptor, optionally after CRON_TZ=<zone>) and returns what is wrong with it,
-- or null when it is well formed. The zone name is checked by the callers (billing.is_time_zone).
create function billing.cron_expr_error(expr text) returns text
language plpgsql immutable parallel safe as $$
declare
    spec  text := btrim(coalesce(expr, ''));
    names constant text[] := array['minute', 'hour', 'day-of-month', 'month', 'day-of-week'];
    lows  constant integer[] := array[0, 0, 1, 1, 0];
    highs constant integer[] := array[59, 23, 31, 12, 6];
    fields text[];
    part   text;
    m      text[];
    lo     integer;
    hi     integer;
    secs   numeric;
begin
    if spec = '' then
        return 'the cron expression is empty';
    end if;
    if spec ~ '^(CRON_)?TZ=' then
        if spec !~ '^(CRON_)?TZ=\S+\s+\S' then
            return 'CRON_TZ= must be followed by a time zone, a space and the schedule';
        end if;
        spec := regexp_replace(spec, '^(CRON_)?TZ=\S+\s+', '');
    end if;

    if left(spec, 1) = '@' then
        if spec in ('@yearly', '@annually', '@monthly', '@weekly', '@daily', '@midnight', '@hourly') then
            return null;
        end if;
        m := regexp_match(spec, '^@every\s+(\S+)$');
        if m is null then
            return format('unknown descriptor "%s": use @yearly, @monthly, @weekly, @daily, @hourly or @every <duration>', spec);
        end if;
        if m[1] !~ '^([0-9]+(\.[0-9]+)?(h|ms|m|s|us|µs|ns))+$' then
            return format('@every needs a duration such as 24h or 1h30m, not "%s"', m[1]);
        end if;
        select sum(x[1]::numeric * case x[2] when 'h' then 3600 when 'm' then 60 when 's' then 1 else 0 end)
          into secs
          from regexp_matches(m[1], '([0-9]+(?:\.[0-9]+)?)(h|ms|m|s|us|µs|ns)', 'g') as x;
        if secs < 60 then
            return format('@every %s is too short: the shortest interval is 1m', m[1]);
        end if;
        return null;
    end if;

    fields := regexp_split_to_array(spec, '\s+');
    if cardinality(fields) <> 5 then
        return format('a cron expression has 5 fields (minute hour day-of-month month day-of-week), "%s" has %s',
                      spec, cardinality(fields));
    end if;
    for i in 1..5 loop
        foreach part in array string_to_array(fields[i], ',') loop
            m := regexp_match(lower(part), '^(\*|\?|[a-z0-9]+)(?:-([a-z0-9]+))?(?:/([0-9]+))?$');
            if m is null or (m[1] in ('*', '?') and m[2] is not null) then
                return format('%s field "%s" is not valid', names[i], fields[i]);
            end if;
            if m[1] in ('*', '?') then
                lo := lows[i];
                hi := highs[i];
            else
                lo := billing.cron_field_value(m[1], i);
                hi := case when m[2] is not null then billing.cron_field_value(m[2], i)
                           when m[3] is not null then highs[i]
                           else lo end;
                if lo is null or hi is null then
                    return format('%s field "%s" is not valid', names[i], fields[i]);
                end if;
            end if;
            if lo < lows[i] or hi > highs[i] then
                return format('%s field "%s" is out of range (%s-%s)', names[i], fields[i], lows[i], highs[i]);
            end if;
            if lo > hi then
                return format('%s field "%s": the range starts after it ends', names[i], fields[i]);
            end if;
            if m[3] is not null and m[3]::numeric = 0 then
                return format('%s field "%s": the step must be positive', names[i], fields[i]);
            end if;
        end loop;
    end loop;
    return null;
end
$$;
-- +goose StatementEnd

-- +goose StatementBegin
-- The local month of installment 1 of a plan on a monthly anchor day: starts_at's month in
-- time_zone, or the next one when the (clamped) anchor day is already past on starts_at's date.
create function billing.monthly_first_month(starts_at timestamptz, time_zone text, anchor_day integer) returns date
language sql stable parallel safe
return date_trunc('month', starts_at at time zone time_zone)::date
    + case when least(anchor_day, ((date_trunc('month', starts_at at time zone time_zone) + interval '1 month')::date
                                   - date_trunc('month', starts_at at time zone time_zone)::date))
                < extract(day from starts_at at time zone time_zone)
           then interval '1 month' else interval '0' end;
-- +goose StatementEnd

-- +goose StatementBegin
-- When installment n of a monthly plan falls due, from the plan's first month and local time of
-- day: anchor_day clamped to the end of month first_month + (n-1), at due_time in time_zone.
-- Each date comes from the anchor, never from the previous one, so clamping does not drift.
-- A plain expression that the planner inlines: the due computation calls it for every row.
create function billing.monthly_due_on(first_month date, due_time time, time_zone text, anchor_day integer, n integer)
returns timestamptz
language sql stable parallel safe
return ((first_month + make_interval(months => n - 1))::date
        + (least(anchor_day, (first_month + make_interval(months => n))::date
                             - (first_month + make_interval(months => n - 1))::date) - 1)
        + due_time) at time zone time_zone;
-- +goose StatementEnd

-- +goose StatementBegin
-- When installment n (1-based) of a plan on a monthly anchor day falls due: anchor_day (1..31)
-- clamped to the month's end (31 -> Feb 28 or 29, back to 31 in March), at starts_at's local
-- time of day in time_zone, the first at or after starts_at's local date. A local time that a
-- daylight-saving change skips moves forward by the gap; one that it repeats means the later
-- occurrence (PostgreSQL's AT TIME ZONE rule). jobs.MonthlyDue is the same rule in Go; a test
-- keeps them equal.
create function billing.monthly_due_at(starts_at timestamptz, time_zone text, anchor_day integer, n integer)
returns timestamptz
language sql stable parallel safe
return billing.monthly_due_on(billing.monthly_first_month(starts_at, time_zone, anchor_day),
                              (starts_at at time zone time_zone)::time, time_zone, anchor_day, n);
-- +goose StatementEnd

-- +goose StatementBegin
-- Keeps a monthly plan's first_month and due_time, from which each due date is computed cheaply,
-- in step with starts_at, anchor_day and time_zone, however the row is written.
create function billing.installment_plans_monthly_fill() returns trigger
language plpgsql as $$
begin
    if new.schedule_kind = 'monthly' then
        new.first_month := billing.monthly_first_month(new.starts_at, new.time_zone, new.anchor_day);
        new.due_time := (new.starts_at at time zone new.time_zone)::time;
    else
        new.first_month := null;
        new.due_time := null;
    end if;
    return new;
end
$$;
-- +goose StatementEnd

create trigger installment_plans_monthly_fill
    before insert or update of schedule_kind, starts_at, anchor_day, time_zone on billing.installment_plans
    for each row execute function billing.installment_plans_monthly_fill();

-- +goose StatementBegin
-- The amount of installment k of a plan: total/count, plus total%count on the installment that
-- takes the remainder, so that the installments add up to the total exactly (money.Split).
create function billing.installment_amount(total bigint, installment_count integer, remainder text, k integer)
returns bigint
language sql immutable parallel safe
return total / installment_count
    + case when (remainder = 'first' and k = 1) or (remainder = 'last' and k = installment_count)
           then total % installment_count else 0 end;
-- +goose StatementEnd

-- +goose StatementBegin
-- Creates an installment plan and returns its id. Errors raise SQLSTATE 22023
-- (invalid_parameter_value) for a bad argument, P0002 (no_data_found) for an unknown customer and
-- 23505 (unique_violation) for a request_key already used with other parameters; nothing is
-- written then. The same request_key returns the same plan instead of a second one.
create function billing.create_installment_plan(
    customer_ref      text,
    description       text,
    total_amount      bigint,
    currency          text,
    installment_count integer,
    cron_expr         text        default null,
    anchor_day        integer     default null,
    time_zone         text        default null,
    starts_at         timestamptz default now(),
    remainder_to      text        default 'first',
    request_key       text        default null
) returns bigint
language plpgsql as $$
#variable_conflict use_column
declare
    v_customer_id bigint;
    v_currency    text := lower(btrim(currency));
    v_cron        text := nullif(btrim(cron_expr), '');
    v_cron_zone   text := billing.cron_expr_zone(cron_expr);
    v_zone        text := coalesce(billing.cron_expr_zone(cron_expr), nullif(btrim(time_zone), ''), 'UTC');
    v_err         text;
    v_id          bigint;
    v_plan        billing.installment_plans;
begin
    if customer_ref is null or btrim(customer_ref) = '' then
        raise exception 'customer_ref is required' using errcode = 'invalid_parameter_value',
            hint = 'Pass the application''s reference of the customer, as given to billing.start_setup.';
    end if;
    select c.id into v_customer_id from billing.customers c where c.customer_ref = create_installment_plan.customer_ref;
    if not found then
        raise exception 'no customer with customer_ref %', quote_literal(customer_ref) using errcode = 'no_data_found',
            hint = 'Create the customer first with billing.start_setup.';
    end if;
    if description is null or btrim(description) = '' then
        raise exception 'description is required' using errcode = 'invalid_parameter_value',
            hint = 'It is shown to the customer with each installment, e.g. ''Sofa, 3 monthly installments''.';
    end if;
    if total_amount is null or total_amount <= 0 then
        raise exception 'total_amount must be positive, got %', coalesce(total_amount::text, 'null') using errcode = 'invalid_parameter_value',
            hint = 'Amounts are integers in the currency''s minor unit (cents for usd, yen for jpy).';
    end if;
    if v_currency is null or not exists (select 1 from billing.currencies c where c.code = v_currency) then
        raise exception 'unknown currency %', coalesce(quote_literal(currency), 'null') using errcode = 'invalid_parameter_value',
            hint = 'Use an ISO 4217 code listed in billing.currencies, such as ''usd'' or ''jpy''.';
    end if;
    if installment_count is null or installment_count not between 1 and 1000 then
        raise exception 'installment_count must be between 1 and 1000, got %', coalesce(installment_count::text, 'null')
            using errcode = 'invalid_parameter_value';
    end if;
    if total_amount < installment_count then
        raise exception 'total_amount % cannot be split into % installments of at least 1 minor unit', total_amount, installment_count
            using errcode = 'invalid_parameter_value', hint = 'Use fewer installments or check the amount''s unit.';
    end if;
    if (v_cron is null) = (anchor_day is null) then
        raise exception 'give exactly one schedule: cron_expr or anchor_day' using errcode = 'invalid_parameter_value',
            hint = 'anchor_day => 31 charges on the 31st (clamped to the month''s end); cron_expr => ''0 9 1 * *'' charges at 09:00 on the 1st.';
    end if;
    if anchor_day is not null and anchor_day not between 1 and 31 then
        raise exception 'anchor_day must be between 1 and 31, got %', anchor_day using errcode = 'invalid_parameter_value',
            hint = 'Days past a month''s end fall on its last day: 31 means the last day of every month.';
    end if;
    v_err := case when v_cron is not null then billing.cron_expr_error(v_cron) end;
    if v_err is not null then
        raise exception 'cron_expr: %', v_err using errcode = 'invalid_parameter_value',
            hint = 'robfig/cron standard syntax: minute hour day-of-month month day-of-week, optionally after CRON_TZ=<zone>, or @monthly, @weekly, @daily, @every 720h.';
    end if;
    if v_cron_zone is not null and nullif(btrim(time_zone), '') is not null and btrim(time_zone) <> v_cron_zone then
        raise exception 'time_zone % disagrees with the expression''s CRON_TZ=%', quote_literal(time_zone), v_cron_zone
            using errcode = 'invalid_parameter_value', hint = 'Give the zone once, in CRON_TZ= or in time_zone.';
    end if;
    if not billing.is_time_zone(v_zone) then
        raise exception 'unknown time zone %', quote_literal(v_zone) using errcode = 'invalid_parameter_value',
            hint = 'Use an IANA zone name such as ''Europe/Paris'' or ''UTC'' (see pg_timezone_names).';
    end if;
    if starts_at is null or starts_at not between '2000-01-01' and '2200-01-01' then
        raise exception 'starts_at must be a date between 2000 and 2200, got %', coalesce(starts_at::text, 'null')
            using errcode = 'invalid_parameter_value',
            hint = 'Installments fall on or after starts_at; any already past are charged at once, each once.';
    end if;
    if remainder_to is null or remainder_to not in ('first', 'last') then
        raise exception 'remainder_to must be ''first'' or ''last'', got %', coalesce(quote_literal(remainder_to), 'null')
            using errcode = 'invalid_parameter_value',
            hint = 'It names the installment that takes the minor units left when the total does not divide evenly.';
    end if;
    if request_key is not null and btrim(request_key) = '' then
        raise exception 'request_key must not be blank' using errcode = 'invalid_parameter_value',
            hint = 'Pass null, or a key that names this request so that a retry returns the same plan.';
    end if;

    insert into billing.installment_plans as p (customer_id, description, total_amount, currency, installment_count,
        remainder_installment, schedule_kind, cron_expr, anchor_day, time_zone, starts_at, status, next_due_at, request_key)
    values (v_customer_id, btrim(description), total_amount, v_currency, installment_count, remainder_to,
        case when v_cron is null then 'monthly' else 'cron' end, v_cron, anchor_day, v_zone, starts_at,
        case when v_cron is null then 'active' else 'schedule_pending' end,
        case when v_cron is null then billing.monthly_due_at(starts_at, v_zone, anchor_day, 1) end,
        request_key)
    on conflict (request_key) where request_key is not null do nothing
    returning p.id into v_id;
    if v_id is not null then
        return v_id;
    end if;

    -- The request_key exists: a retry gets its plan back, a different request an error.
    select * into v_plan from billing.installment_plans p where p.request_key = create_installment_plan.request_key;
    if (v_plan.customer_id, v_plan.description, v_plan.total_amount, v_plan.currency, v_plan.installment_count,
        v_plan.remainder_installment, v_plan.cron_expr, v_plan.anchor_day, v_plan.time_zone)
       is distinct from
       (v_customer_id, btrim(description), total_amount, v_currency, installment_count,
        remainder_to, v_cron, anchor_day::smallint, v_zone) then
        raise exception 'request_key % already names installment plan % with other parameters', quote_literal(request_key), v_plan.id
            using errcode = 'unique_violation', hint = 'Use a new request_key for a new plan.';
    end if;
    return v_plan.id;
end
$$;
-- +goose StatementEnd

-- +goose StatementBegin
-- Cancels a plan: no further installment is charged, and the charge job cancels, instead of
-- sending, a charge of the plan that it has not sent yet. Returns true when this call canceled the plan and
-- false when it was already canceled. Errors: P0002 unknown plan, 55000
-- (object_not_in_prerequisite_state) for a completed plan, 22023 for a missing reason.
create function billing.cancel_installment_plan(plan_id bigint, reason text) returns boolean
language plpgsql as $$
declare
    v_status text;
begin
    if reason is null or btrim(reason) = '' then
        raise exception 'reason is required' using errcode = 'invalid_parameter_value',
            hint = 'Say why, e.g. ''customer returned the goods''; it is kept in status_reason.';
    end if;
    -- The row lock waits for a due computation that holds the plan, so a cancel never races a charge.
    select p.status into v_status from billing.installment_plans p where p.id = plan_id for update;
    if not found then
        raise exception 'no installment plan %', coalesce(plan_id::text, 'null') using errcode = 'no_data_found';
    end if;
    if v_status = 'canceled' then
        return false;
    end if;
    if v_status = 'completed' then
        raise exception 'installment plan % is completed: no installment is left to cancel', plan_id
            using errcode = 'object_not_in_prerequisite_state',
                  hint = 'Cancel or refund its charges instead (billing.cancel_charge).';
    end if;
    update billing.installment_plans p
       set status = 'canceled', status_reason = btrim(reason), canceled_at = now(), next_due_at = null, updated_at = now()
     where p.id = plan_id;
    return true;
end
$$;
-- +goose StatementEnd

-- +goose StatementBegin
-- Creates a top-up rule and returns its id. A threshold rule (threshold_amount given) fires when
-- the customer's billing.balances amount in the rule's currency falls below threshold_amount and
-- charges target_amount minus the balance, or fixed_amount; at most one of its top-ups is open at
-- a time, it waits cooldown (default 1 hour) after each firing, and fires at most max_per_period
-- times in any cap_period (default 1 day) when max_per_period is given. A scheduled rule
-- (cron_expr given) charges fixed_amount at every occurrence of its schedule. Errors as for
-- billing.create_installment_plan; nothing is written on an error.
create function billing.create_topup_rule(
    customer_ref     text,
    description      text,
    currency         text,
    threshold_amount bigint   default null,
    target_amount    bigint   default null,
    fixed_amount     bigint   default null,
    cron_expr        text     default null,
    time_zone        text     default null,
    cooldown         interval default null,
    max_per_period   integer  default null,
    cap_period       interval default null,
    request_key      text     default null
) returns bigint
language plpgsql as $$
#variable_conflict use_column
declare
    v_customer_id bigint;
    v_currency    text := lower(btrim(currency));
    v_cron        text := nullif(btrim(cron_expr), '');
    v_cron_zone   text := billing.cron_expr_zone(cron_expr);
    v_zone        text := coalesce(billing.cron_expr_zone(cron_expr), nullif(btrim(time_zone), ''), 'UTC');
    v_kind        text;
    v_err         text;
    v_id          bigint;
    v_rule        billing.topup_rules;
begin
    if customer_ref is null or btrim(customer_ref) = '' then
        raise exception 'customer_ref is required' using errcode = 'invalid_parameter_value',
            hint = 'Pass the application''s reference of the customer, as given to billing.start_setup.';
    end if;
    select c.id into v_customer_id from billing.customers c where c.customer_ref = create_topup_rule.customer_ref;
    if not found then
        raise exception 'no customer with customer_ref %', quote_literal(customer_ref) using errcode = 'no_data_found',
            hint = 'Create the customer first with billing.start_setup.';
    end if;
    if description is null or btrim(description) = '' then
        raise exception 'description is required' using errcode = 'invalid_parameter_value',
            hint = 'It is shown to the customer with each top-up, e.g. ''Prepaid credit top-up''.';
    end if;
    if v_currency is null or not exists (select 1 from billing.currencies c where c.code = v_currency) then
        raise exception 'unknown currency %', coalesce(quote_literal(currency), 'null') using errcode = 'invalid_parameter_value',
            hint = 'Use an ISO 4217 code listed in billing.currencies, such as ''usd'' or ''jpy''.';
    end if;
    if (threshold_amount is null) = (v_cron is null) then
        raise exception 'give exactly one trigger: threshold_amount or cron_expr' using errcode = 'invalid_parameter_value',
            hint = 'threshold_amount => 500 fires when the balance falls below 500; cron_expr => ''0 9 * * 1'' charges fixed_amount every Monday at 09:00.';
    end if;
    if fixed_amount is not null and fixed_amount <= 0 then
        raise exception 'fixed_amount must be positive, got %', fixed_amount using errcode = 'invalid_parameter_value',
            hint = 'Amounts are integers in the currency''s minor unit (cents for usd, yen for jpy).';
    end if;

    if threshold_amount is not null then
        v_kind := 'threshold';
        if threshold_amount < 0 then
            raise exception 'threshold_amount must not be negative, got %', threshold_amount using errcode = 'invalid_parameter_value';
        end if;
        if (target_amount is null) = (fixed_amount is null) then
            raise exception 'a threshold rule needs exactly one of target_amount and fixed_amount' using errcode = 'invalid_parameter_value',
                hint = 'target_amount tops the balance back up to that amount; fixed_amount charges the same amount each time.';
        end if;
        if target_amount is not null and target_amount <= threshold_amount then
            raise exception 'target_amount % must be above threshold_amount %', target_amount, threshold_amount
                using errcode = 'invalid_parameter_value';
        end if;
        if cooldown is not null and cooldown < interval '0' then
            raise exception 'cooldown must not be negative, got %', cooldown using errcode = 'invalid_parameter_value';
        end if;
        if max_per_period is not null and max_per_period <= 0 then
            raise exception 'max_per_period must be positive, got %', max_per_period using errcode = 'invalid_parameter_value',
                hint = 'Leave it null for no cap.';
        end if;
        if cap_period is not null and max_per_period is null then
            raise exception 'cap_period needs max_per_period' using errcode = 'invalid_parameter_value',
                hint = 'max_per_period => 3, cap_period => ''1 day'' allows three top-ups in any 24 hours.';
        end if;
        if cap_period is not null and cap_period <= interval '0' then
            raise exception 'cap_period must be positive, got %', cap_period using errcode = 'invalid_parameter_value';
        end if;
        if nullif(btrim(time_zone), '') is not null then
            raise exception 'time_zone applies to scheduled rules only' using errcode = 'invalid_parameter_value';
        end if;
    else
        v_kind := 'scheduled';
        if fixed_amount is null then
            raise exception 'a scheduled rule needs fixed_amount' using errcode = 'invalid_parameter_value';
        end if;
        if target_amount is not null or cooldown is not null or max_per_period is not null or cap_period is not null then
            raise exception 'target_amount, cooldown, max_per_period and cap_period apply to threshold rules only'
                using errcode = 'invalid_parameter_value',
                hint = 'A scheduled rule charges fixed_amount once at every occurrence of its schedule.';
        end if;
        v_err := billing.cron_expr_error(v_cron);
        if v_err is not null then
            raise exception 'cron_expr: %', v_err using errcode = 'invalid_parameter_value',
                hint = 'robfig/cron standard syntax: minute hour day-of-month month day-of-week, optionally after CRON_TZ=<zone>, or @monthly, @weekly, @daily, @every 168h.';
        end if;
        if v_cron_zone is not null and nullif(btrim(time_zone), '') is not null and btrim(time_zone) <> v_cron_zone then
            raise exception 'time_zone % disagrees with the expression''s CRON_TZ=%', quote_literal(time_zone), v_cron_zone
                using errcode = 'invalid_parameter_value', hint = 'Give the zone once, in CRON_TZ= or in time_zone.';
        end if;
        if not billing.is_time_zone(v_zone) then
            raise exception 'unknown time zone %', quote_literal(v_zone) using errcode = 'invalid_parameter_value',
                hint = 'Use an IANA zone name such as ''Europe/Paris'' or ''UTC'' (see pg_timezone_names).';
        end if;
    end if;
    if request_key is not null and btrim(request_key) = '' then
        raise exception 'request_key must not be blank' using errcode = 'invalid_parameter_value',
            hint = 'Pass null, or a key that names this request so that a retry returns the same rule.';
    end if;

    insert into billing.topup_rules as r (customer_id, description, currency, kind, threshold_amount, target_amount,
        fixed_amount, cron_expr, time_zone, cooldown, max_per_period, cap_period, status, request_key)
    values (v_customer_id, btrim(description), v_currency, v_kind, threshold_amount, target_amount, fixed_amount,
        v_cron, v_zone, coalesce(cooldown, case when v_kind = 'threshold' then interval '1 hour' else interval '0' end),
        max_per_period, coalesce(cap_period, interval '1 day'),
        case when v_kind = 'scheduled' then 'schedule_pending' else 'active' end, request_key)
    on conflict (request_key) where request_key is not null do nothing
    returning r.id into v_id;
    if v_id is not null then
        return v_id;
    end if;

    select * into v_rule from billing.topup_rules r where r.request_key = create_topup_rule.request_key;
    if (v_rule.customer_id, v_rule.description, v_rule.currency, v_rule.kind, v_rule.threshold_amount, v_rule.target_amount,
        v_rule.fixed_amount, v_rule.cron_expr, v_rule.time_zone, v_rule.max_per_period)
       is distinct from
       (v_customer_id, btrim(description), v_currency, v_kind, threshold_amount, target_amount,
        fixed_amount, v_cron, v_zone, max_per_period) then
        raise exception 'request_key % already names top-up rule % with other parameters', quote_literal(request_key), v_rule.id
            using errcode = 'unique_violation', hint = 'Use a new request_key for a new rule.';
    end if;
    return v_rule.id;
end
$$;
-- +goose StatementEnd

-- +goose StatementBegin
-- Cancels a top-up rule: it fires no more, and the charge job cancels, instead of sending, a
-- top-up of the rule that it has not sent yet. Returns true when this
-- call canceled the rule, false when it was already canceled. Errors: P0002 unknown rule, 22023
-- missing reason.
create function billing.cancel_topup_rule(rule_id bigint, reason text) returns boolean
language plpgsql as $$
declare
    v_status text;
begin
    if reason is null or btrim(reason) = '' then
        raise exception 'reason is required' using errcode = 'invalid_parameter_value',
            hint = 'Say why, e.g. ''customer turned auto top-up off''; it is kept in status_reason.';
    end if;
    select r.status into v_status from billing.topup_rules r where r.id = rule_id for update;
    if not found then
        raise exception 'no top-up rule %', coalesce(rule_id::text, 'null') using errcode = 'no_data_found';
    end if;
    if v_status = 'canceled' then
        return false;
    end if;
    update billing.topup_rules r
       set status = 'canceled', status_reason = btrim(reason), canceled_at = now(), next_due_at = null, updated_at = now()
     where r.id = rule_id;
    return true;
end
$$;
-- +goose StatementEnd

-- +goose StatementBegin
-- Sets a customer's balance in a currency (minor units; may be negative). A convenience for the
-- host application, which may also write billing.balances directly.
create function billing.set_balance(customer_ref text, currency text, amount bigint) returns void
language plpgsql as $$
declare
    v_customer_id bigint;
    v_currency    text := lower(btrim(currency));
begin
    select c.id into v_customer_id from billing.customers c where c.customer_ref = set_balance.customer_ref;
    if not found then
        raise exception 'no customer with customer_ref %', coalesce(quote_literal(customer_ref), 'null') using errcode = 'no_data_found';
    end if;
    if v_currency is null or not exists (select 1 from billing.currencies c where c.code = v_currency) then
        raise exception 'unknown currency %', coalesce(quote_literal(currency), 'null') using errcode = 'invalid_parameter_value',
            hint = 'Use an ISO 4217 code listed in billing.currencies, such as ''usd'' or ''jpy''.';
    end if;
    if amount is null then
        raise exception 'amount is required' using errcode = 'invalid_parameter_value';
    end if;
    insert into billing.balances as b (customer_id, currency, amount, updated_at)
    values (v_customer_id, v_currency, amount, now())
    on conflict on constraint balances_pkey do update set amount = excluded.amount, updated_at = excluded.updated_at;
end
$$;
-- +goose StatementEnd

-- +goose Down
-- Rows in the states this migration added fall back to 'paused', which the older schema knows.
update billing.installment_plans set status = 'paused', next_due_at = null where status in ('schedule_pending', 'invalid');
update billing.topup_rules set status = 'paused' where status in ('schedule_pending', 'invalid');
drop function billing.set_balance(text, text, bigint);
drop function billing.cancel_topup_rule(bigint, text);
drop function billing.create_topup_rule(text, text, text, bigint, bigint, bigint, text, text, interval, integer, interval, text);
drop function billing.cancel_installment_plan(bigint, text);
drop function billing.create_installment_plan(text, text, bigint, text, integer, text, integer, text, timestamptz, text, text);
drop function billing.installment_amount(bigint, integer, text, integer);
drop function billing.monthly_due_at(timestamptz, text, integer, integer);
drop trigger installment_plans_monthly_fill on billing.installment_plans;
drop function billing.installment_plans_monthly_fill();
drop function billing.monthly_due_on(date, time, text, integer, integer);
drop function billing.monthly_first_month(timestamptz, text, integer);
drop function billing.cron_expr_error(text);
drop function billing.cron_field_value(text, integer);
drop function billing.cron_expr_zone(text);
drop function billing.is_time_zone(text);
drop table billing.time_zones;
drop index billing.topup_rules_request_key_key;
drop index billing.installment_plans_request_key_key;
drop table billing.balances;
drop index billing.charges_topup_due_idx;
drop index billing.charges_topup_open_idx;
drop index billing.topup_rules_pending_idx;
drop index billing.topup_rules_scheduled_due_idx;
drop index billing.topup_rules_threshold_idx;
alter table billing.topup_rules
    drop constraint topup_rules_scheduled_due_check,
    drop constraint topup_rules_invalid_check,
    drop constraint topup_rules_canceled_check,
    drop column request_key,
    drop column canceled_at,
    drop column status_reason,
    drop column time_zone,
    drop constraint topup_rules_status_check,
    add constraint topup_rules_status_check check (status in ('active', 'paused', 'canceled'));
drop index billing.installment_plans_pending_idx;
drop index billing.installment_plans_due_idx;
create index installment_plans_due_idx on billing.installment_plans (next_due_at) where status = 'active';
alter table billing.installment_plans
    drop constraint installment_plans_invalid_check,
    drop constraint installment_plans_canceled_check,
    drop column due_time,
    drop column first_month,
    drop column request_key,
    drop column canceled_at,
    drop column status_reason,
    drop constraint installment_plans_status_check,
    add constraint installment_plans_status_check check (status in ('active', 'paused', 'completed', 'canceled'));
