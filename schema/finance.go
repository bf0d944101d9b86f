package schema

import (
	"context"
	"fmt"

	"github.com/jackc/pgx/v5/pgxpool"
)

// setAdhocCeilingQuery writes the default row of billing.adhoc_limits (currency null), which
// applies to every currency without a row of its own.
const setAdhocCeilingQuery = `
insert into billing.adhoc_limits (currency, max_amount) values (null, $1)
on conflict ((currency is null)) where currency is null do update
    set max_amount = excluded.max_amount, updated_at = now()
    where billing.adhoc_limits.max_amount is distinct from excluded.max_amount`

// SetAdhocCeiling stores maxAmount (BILLING_ADHOC_CEILING, in minor units) as the default
// ceiling of billing.enqueue_charge, for currencies that have no row of their own in
// billing.adhoc_limits. `billingd run` calls it at start; per-currency rows are left alone.
// maxAmount must be positive.
func SetAdhocCeiling(ctx context.Context, pool *pgxpool.Pool, maxAmount int64) error {
	if maxAmount < 1 {
		return fmt.Errorf("ad-hoc ceiling %d: must be positive", maxAmount)
	}
	if _, err := pool.Exec(ctx, setAdhocCeilingQuery, maxAmount); err != nil {
		return fmt.Errorf("store the default ad-hoc ceiling: %w", err)
	}
	return nil
}
