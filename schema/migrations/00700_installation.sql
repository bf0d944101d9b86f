-- +goose Up
-- The installation: one random id per billing database, generated here. Several installations
-- (databases) may share one Stripe account; the id keeps them apart there. billingd puts it in
-- every idempotency key it sends and in metadata billingd_installation of every PaymentIntent,
-- Checkout Session and Customer it creates, and it ignores the webhook events and search results
-- of objects that carry another installation's id.
--
-- A copy of this database (a restored backup, a clone for staging) keeps the id. A copy that
-- talks to the same Stripe account as the original, in the same mode, must get a new id before
-- billingd runs on it:
--   update billing.installation set id = gen_random_uuid(), assigned_at = now();
-- (see the README, "Installations sharing a Stripe account").
create table billing.installation (
    -- Always true: the primary key then allows one row only.
    singleton   boolean primary key default true check (singleton),
    id          uuid not null default gen_random_uuid(),
    assigned_at timestamptz not null default now()
);

insert into billing.installation default values;

-- +goose Down
drop table billing.installation;
