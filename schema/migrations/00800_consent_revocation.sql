-- +goose Up
-- Withdrawing consent. The terms' cancellation policy tells the customer how to withdraw their
-- consent to off-session charges; billing.revoke_consent records that they did: their active
-- consents (all of them, or those covering one use) get revoked_at and the reason. The charge job
-- sends nothing under a revoked consent: a charge of that use that falls due afterwards is not
-- sent but goes to recovery, where the customer can pay it on-session. Plans and rules are not
-- canceled by a revocation (the customer may still owe the installments); cancel them with
-- billing.cancel_installment_plan and billing.cancel_topup_rule when they should stop.

alter table billing.consents
    add column revoked_reason text,
    add constraint consents_revoked_reason_check check ((revoked_reason is not null) = (revoked_at is not null)),
    add constraint consents_revoked_reason_blank_check check (btrim(revoked_reason) <> '');

-- Consents revoked before this migration (by hand) get a reason, so that the constraint holds.
update billing.consents set revoked_reason = 'revoked before revocation reasons were recorded'
 where revoked_at is not null;

-- +goose StatementBegin
-- billing.revoke_consent(customer_ref, reason, usage default null) revokes the customer's active
-- consents, or, with usage ('installments', 'topups' or 'adhoc'), those that cover that use (a
-- consent covering several uses is revoked whole: the customer gives a new one for the uses they
-- keep through billing.start_setup). It returns how many it revoked: 0 when none was active, so
-- calling it twice is safe. Bad input raises an error with a HINT and changes nothing.
create function billing.revoke_consent(customer_ref text, reason text, usage text default null) returns integer
language plpgsql as $$
#variable_conflict use_column
declare
    v_ref      text := btrim(revoke_consent.customer_ref);
    v_reason   text := btrim(revoke_consent.reason);
    v_usage    text := lower(btrim(revoke_consent.usage));
    v_customer bigint;
    v_count    integer;
begin
    if v_ref is null or v_ref = '' then
        raise exception 'customer_ref is required'
            using errcode = 'invalid_parameter_value',
                  hint = 'Pass the application''s own reference for the customer, e.g. ''user-42''.';
    end if;
    if v_reason is null or v_reason = '' then
        raise exception 'reason is required'
            using errcode = 'invalid_parameter_value',
                  hint = 'Say why, e.g. ''customer withdrew consent by email on 2026-11-27''; it is kept in billing.consents.revoked_reason.';
    end if;
    if char_length(v_reason) > 1000 then
        raise exception 'reason is longer than 1000 characters'
            using errcode = 'invalid_parameter_value',
                  hint = 'Keep the reason short; store longer records in the application.';
    end if;
    if v_usage is not null and v_usage not in ('installments', 'topups', 'adhoc') then
        raise exception 'usage % is not a use', quote_literal(revoke_consent.usage)
            using errcode = 'invalid_parameter_value',
                  hint = 'The uses are ''installments'', ''topups'' and ''adhoc''; pass null to revoke every consent.';
    end if;
    select c.id into v_customer from billing.customers c where c.customer_ref = v_ref;
    if not found then
        raise exception 'no customer with customer_ref %', quote_literal(v_ref)
            using errcode = 'no_data_found',
                  hint = 'Customers are created by billing.start_setup; check the reference.';
    end if;

    update billing.consents k
       set revoked_at = greatest(now(), k.accepted_at), revoked_reason = v_reason
     where k.customer_id = v_customer and k.revoked_at is null
       and (v_usage is null or v_usage = any (k.usage));
    get diagnostics v_count = row_count;
    return v_count;
end
$$;
-- +goose StatementEnd

comment on function billing.revoke_consent(text, text, text) is
    'Record that a customer withdrew consent to off-session charges (all uses, or one): returns how many active consents were revoked.';

-- +goose Down
drop function billing.revoke_consent(text, text, text);
alter table billing.consents
    drop constraint consents_revoked_reason_blank_check,
    drop constraint consents_revoked_reason_check,
    drop column revoked_reason;
