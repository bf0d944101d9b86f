package jobs

import (
	"context"
	"errors"
	"fmt"
	"sync"

	"github.com/jackc/pgx/v5"

	"github.com/billingd/billingd/internal/stripeapi"
)

// This file holds the installation id (billing.installation): the random id of this billing
// database, which keeps installations that share one Stripe account apart there. Every
// idempotency key billingd sends starts with stripeapi.KeyPrefix(id), and every PaymentIntent,
// Checkout Session and Customer it creates carries metadata billingd_installation=id.

// loadInstallationQuery reads the one row of billing.installation.
const loadInstallationQuery = `select id::text from billing.installation`

// LoadInstallation reads the installation id from the database. A database without one (not
// migrated, or its row deleted) is an error that says how to fix it: billingd never sends a
// key or creates an object without the id.
func LoadInstallation(ctx context.Context, q querier) (string, error) {
	var id string
	err := q.QueryRow(ctx, loadInstallationQuery).Scan(&id)
	switch {
	case errors.Is(err, pgx.ErrNoRows):
		return "", errors.New("billing.installation has no row: this database has no installation id " +
			"(insert one with: insert into billing.installation default values)")
	case err != nil:
		return "", fmt.Errorf("read the installation id (billing.installation; run billingd migrate): %w", err)
	case id == "":
		return "", errors.New("billing.installation holds an empty id")
	}
	return id, nil
}

// installationCache keeps the installation id once read. The id changes only by hand while no
// daemon runs (see the README), so it is read once per process.
type installationCache struct {
	mu sync.Mutex
	id string
}

// Installation returns the installation id of d's database: read with LoadInstallation on first
// use and kept. The daemon calls it before it starts, so that a database without an id stops the
// start; a failed read is not kept, the next call reads again.
func (d *Deps) Installation(ctx context.Context) (string, error) {
	d.installation.mu.Lock()
	defer d.installation.mu.Unlock()
	if d.installation.id != "" {
		return d.installation.id, nil
	}
	if d.Pool == nil {
		return "", errors.New("installation id: no database pool")
	}
	id, err := LoadInstallation(ctx, d.Pool)
	if err != nil {
		return "", err
	}
	d.installation.id = id
	return id, nil
}

// ours reports whether metadata of a Stripe object says that this installation made it. An
// object without metadata billingd_installation was made before objects carried one (or by
// hand): it is accepted as before, and matched back by its other metadata (charge_id, ...).
// Only an object that names another installation is not ours.
func ours(metadata map[string]string, installation string) bool {
	other, ok := metadata[stripeapi.MetadataInstallation]
	return !ok || other == installation
}
