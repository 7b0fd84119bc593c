import './base.css';
import './start-status.css';
