-- +goose Up
-- Pausing and resuming an installment plan. A paused plan is skipped by the due computation; the
-- recovery sweep pauses the plan of an installment written off as uncollectible
-- (BILLING_RECOVERY_PLAN_ON_UNCOLLECTIBLE=pause). Resuming by hand (status = 'active') would
-- charge every installment missed while paused at once, off-session, on the next due run: for a
-- customer who has just defaulted, a burst of charges they may not expect.
-- billing.resume_installment_plan makes the choice explicit: by default the remaining
-- installments continue from now on the plan's schedule (later than first planned, none
-- skipped); with catch_up => true the missed ones are charged at once, each once, in order.

-- +goose StatementBegin
-- Pauses an active (or not yet scheduled) plan: no further installment is charged until it is
-- resumed. Charges already created stand, even those not yet sent. Returns true when this call paused it, false when it was already
-- paused. Errors: 22023 missing reason, P0002 unknown plan, 55000 a completed, canceled or invalid
-- plan.
create function billing.pause_installment_plan(plan_id bigint, reason text) returns boolean
language plpgsql as $$
declare
    v_status text;
begin
    if reason is null or btrim(reason) = '' then
        raise exception 'reason is required' using errcode = 'invalid_parameter_value',
            hint = 'Say why, e.g. ''customer asked for a break until March''; it is kept in status_reason.';
    end if;
    -- The row lock waits for a due computation that holds the plan.
    select p.status into v_status from billing.installment_plans p where p.id = plan_id for update;
    if not found then
        raise exception 'no installment plan %', coalesce(plan_id::text, 'null') using errcode = 'no_data_found';
    end if;
    if v_status = 'paused' then
        return false;
    end if;
    if v_status not in ('active', 'schedule_pending') then
        raise exception 'installment plan % is %: only an active plan can be paused', plan_id, v_status
            using errcode = 'object_not_in_prerequisite_state',
                  hint = 'A completed or canceled plan charges nothing more; an invalid one needs a new plan.';
    end if;
    update billing.installment_plans p
       set status = 'paused', status_reason = btrim(reason), updated_at = now()
     where p.id = plan_id;
    return true;
end
$$;
-- +goose StatementEnd

-- +goose StatementBegin
-- Resumes a paused plan and returns when its next installment falls due (null for a cron plan,
-- whose date the due computation computes within one tick, as for a new one).
--   catch_up => false (the default): the remaining installments continue from now on. A monthly
--     plan moves by whole months (its first_month), so that its next installment falls on the
--     first anchor date at or after now; a cron plan takes the first occurrence of its schedule
--     at or after now (its starts_at becomes now). No installment is skipped: the plan ends
--     later than first planned.
--   catch_up => true: the dates stand; every installment that fell due while the plan was paused
--     is charged on the next due run, each once, in order.
-- Errors: 22023 missing reason, P0002 unknown plan, 55000 a plan that is not paused.
create function billing.resume_installment_plan(plan_id bigint, reason text, catch_up boolean default false)
returns timestamptz
language plpgsql as $$
declare
    v_plan billing.installment_plans;
    v_k    integer := 0;
    v_next timestamptz;
begin
    if reason is null or btrim(reason) = '' then
        raise exception 'reason is required' using errcode = 'invalid_parameter_value',
            hint = 'Say why, e.g. ''customer paid the written-off installment''; it is kept in status_reason.';
    end if;
    if catch_up is null then
        raise exception 'catch_up must be true or false' using errcode = 'invalid_parameter_value',
            hint = 'false continues the remaining installments from now; true charges the missed ones at once.';
    end if;
    select * into v_plan from billing.installment_plans p where p.id = plan_id for update;
    if not found then
        raise exception 'no installment plan %', coalesce(plan_id::text, 'null') using errcode = 'no_data_found';
    end if;
    if v_plan.status <> 'paused' then
        raise exception 'installment plan % is %, not paused', plan_id, v_plan.status
            using errcode = 'object_not_in_prerequisite_state',
                  hint = 'Only a paused plan can be resumed (billing.pause_installment_plan pauses one).';
    end if;

    if v_plan.schedule_kind = 'cron' then
        if catch_up and v_plan.next_due_at is not null then
            update billing.installment_plans p
               set status = 'active', status_reason = btrim(reason), updated_at = now()
             where p.id = plan_id;
            return v_plan.next_due_at;
        end if;
        -- The due computation's first pass computes the first occurrence at or after starts_at.
        update billing.installment_plans p
           set status = 'schedule_pending', next_due_at = null, starts_at = now(),
               status_reason = btrim(reason), updated_at = now()
         where p.id = plan_id;
        return null;
    end if;

    -- A monthly plan: installment n falls on anchor_day (clamped) of month first_month + n - 1.
    v_next := billing.monthly_due_on(v_plan.first_month, v_plan.due_time, v_plan.time_zone, v_plan.anchor_day, v_plan.next_installment);
    if catch_up then
        update billing.installment_plans p
           set status = 'active', next_due_at = v_next, status_reason = btrim(reason), updated_at = now()
         where p.id = plan_id;
        return v_next;
    end if;
    -- Move the plan by whole months until its next installment is not in the past. The dates
    -- come from first_month (billing.monthly_due_on), which moves; starts_at keeps the plan's
    -- original start (moving it would let the fill trigger recompute first_month, which can
    -- land a month off when the anchor day is clamped).
    while v_next < now() loop
        v_k := v_k + 1;
        v_next := billing.monthly_due_on((v_plan.first_month + make_interval(months => v_k))::date, v_plan.due_time,
                                         v_plan.time_zone, v_plan.anchor_day, v_plan.next_installment);
    end loop;
    update billing.installment_plans p
       set first_month = (p.first_month + make_interval(months => v_k))::date, next_due_at = v_next,
           status = 'active', status_reason = btrim(reason), updated_at = now()
     where p.id = plan_id;
    return v_next;
end
$$;
-- +goose StatementEnd

comment on function billing.pause_installment_plan(bigint, text) is
    'Pause an installment plan: nothing more is charged until billing.resume_installment_plan.';
comment on function billing.resume_installment_plan(bigint, text, boolean) is
    'Resume a paused installment plan: the remaining installments continue from now (or, with catch_up, the missed ones are charged at once). Returns the next due date.';

-- +goose Down
drop function billing.resume_installment_plan(bigint, text, boolean);
drop function billing.pause_installment_plan(bigint, text);
