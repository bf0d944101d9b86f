package jobs

import "github.com/riverqueue/river"

// ChargeArgs asks for one charge to be collected off-session. The charge row is the truth: the
// job only names it, so running the job twice, or after the charge was settled, is harmless.
//
// Inserted by the due computation, by billing.enqueue_charge (from SQL, as
// {"charge_id": N} with kind 'charge' on queue 'charges') and by retries of soft declines.
type ChargeArgs struct {
	ChargeID int64 `json:"charge_id"`
}

// Kind is the job kind, also used by billing.enqueue_charge in SQL: keep it stable.
func (ChargeArgs) Kind() string { return "charge" }

// InsertOpts puts charge jobs on their own queue.
func (ChargeArgs) InsertOpts() river.InsertOpts {
	return river.InsertOpts{Queue: QueueCharges, MaxAttempts: 25}
}
